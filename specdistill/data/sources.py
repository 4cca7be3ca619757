"""Importing this module registers every data source with ``specdistill.data.DATA_SOURCES``."""

from specdistill.data import (
    fashion_mnist,  # noqa: F401  fashion-mnist
    folder,  # noqa: F401  imagefolder, cifar100
    glyphs,  # noqa: F401  glyphs-latin
    hanzi,  # noqa: F401  glyphs-hanzi
    synthetic,  # noqa: F401  synthetic
)
