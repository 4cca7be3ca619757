"""specdistill: specialist ensembles for very large label spaces, distilled into one model.

Shared machinery only; the pipeline stages live in the top-level packages ``generalist``,
``clustering``, ``specialists``, ``combine`` and ``student``, which import this package and never
the other way round.
"""

from specdistill.errors import SpecdistillError

__all__ = ["SpecdistillError"]
__version__ = "0.1.0"
