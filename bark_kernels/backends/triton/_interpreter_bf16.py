"""Placeholder: replaced below."""
def apply():
    return "not implemented yet"
