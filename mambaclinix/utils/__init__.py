"""Small helpers shared by every package of mambaclinix; they import nothing above the standard library
(and numpy/torch where a function's signature needs them)."""

from mambaclinix.utils.atomic import (
    atomic_directory,
    atomic_path,
    atomic_write,
    fsync_directory,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

__all__ = [
    "atomic_directory",
    "atomic_path",
    "atomic_write",
    "fsync_directory",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]
