"""The errors srlib raises for a user's mistake.

Every error a user can cause by their input (a bad file, a bad flag, a missing data folder)
is an `SrlibError` with a one-line message that names the problem and, where there is one,
the fix. The command line prints that line and exits with code 2; no traceback.
"""


class SrlibError(ValueError):
    """A problem with the user's input or setup, explained in one line."""


class DataError(SrlibError):
    """Bad preference data: a malformed file, a missing or empty field, an empty data set."""


class ConfigError(SrlibError):
    """A bad setting: layer out of range, K larger than the SAE, widths that disagree, ..."""


class DamagedFileError(SrlibError):
    """A file srlib wrote (a saved model, an SAE, a cache entry) that cannot be read back."""


def one_line(text: str, limit: int = 200) -> str:
    """`text` squeezed onto one line of at most `limit` characters (error messages are one line)."""
    return " ".join(text.split())[:limit]
