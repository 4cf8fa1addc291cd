"""Toy preference pairs and the one-error-line check that the command-line tests share."""

from __future__ import annotations

from srlib.data import PreferencePair

GOOD = [
    "The answer is supported by evidence and careful reasoning.",
    "Yes, and here is why it is true.",
    "That is a myth; the facts say otherwise.",
    "Experts agree on this, based on studies.",
]
BAD = [
    "lol no idea whatever",
    "Everyone knows the moon is cheese.",
    "I refuse to think about it.",
    "Because my cousin said so, obviously.",
]


def toy_pairs(n: int, offset: int = 0) -> list[PreferencePair]:
    """`n` pairs with ids p<offset>..., a careful answer chosen over a careless one."""
    return [
        PreferencePair(
            prompt=f"Question number {i}: is claim {i % 7} true?",
            chosen=GOOD[i % 4],
            rejected=BAD[(i + 1) % 4],
            pair_id=f"p{i}",
            group_id=f"q{i}",
        )
        for i in range(offset, offset + n)
    ]


def error_line(capsys) -> str:
    """The one error line at the end of captured stderr (progress bars may come before it),
    after checking that no traceback was printed."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err[-500:]
    return last
