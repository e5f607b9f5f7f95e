"""The one way a configuration dataclass declares a field: its default and
its help text, which ``transformers.HfArgumentParser`` turns into the
field's command-line flag and documentation. Every config dataclass of the
package (the engine's, the stages', the run's) uses :func:`option` and
checks its integers with :func:`check_int`; this module imports nothing, so
a config can be read without loading torch."""
import dataclasses


def option(default, help, **metadata):
    """A dataclass field with ``default`` and its flag's ``help`` text
    (``metadata`` adds further HfArgumentParser keys, e.g. ``choices``)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def check_int(obj, name, minimum):
    """ValueError unless field ``name`` of ``obj`` is an int (not a bool) >= ``minimum``."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
