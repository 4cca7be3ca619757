"""The paper's smaller distillation experiments (Hinton, Vinyals & Dean 2015, sections 3 and 6).

Every experiment is a question about distillation alone: does a small net taught by soft targets
close the gap to a large one, at which temperature, with a class missing from the transfer set,
from little data, from a synthetic transfer set. They run on a dataset directly, with two-hidden-
layer MLPs like the paper's, so they sit apart from the pipeline and import only ``specdistill``.

* ``paper.lab``: the :class:`~paper.lab.Lab` every experiment trains through, and its results;
* ``paper.experiments``: on the full transfer set (gap, temperature, missing class);
* ``paper.transfer``: on a small labelled set (small data, synthetic transfer set);
* ``paper.run``: the table of experiments and the runner that
  ``benchmarks/bench_paper_fmnist.py`` drives from ``configs/paper-fmnist.yaml``.
"""
