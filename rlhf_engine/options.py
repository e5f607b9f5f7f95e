"""The one way a configuration dataclass declares a field: its default and
its help text, which ``transformers.HfArgumentParser`` turns into the
field's command-line flag and documentation. Every config dataclass of the
package (the engine's, the stages', the run's) uses :func:`option`; this
module imports nothing, so a config can be read without loading torch."""
import dataclasses


def option(default, help, **metadata):
    """A dataclass field with ``default`` and its flag's ``help`` text
    (``metadata`` adds further HfArgumentParser keys, e.g. ``choices``)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})
