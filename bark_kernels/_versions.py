"""Version strings as comparable tuples (no dependency on packaging)."""

from __future__ import annotations


def version_tuple(text: str, parts: int = 2) -> tuple[int, ...]:
    """The first ``parts`` numeric components: '2.6.3' -> (2, 6), '5.0.0rc1' -> (5, 0), '2.1.post1' -> (2, 1); a
    component without digits counts as 0."""
    numbers = []
    for piece in text.split(".")[:parts]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers)
