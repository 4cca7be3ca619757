"""What only the tests and benchmarks use: slow reference solvers and synthetic predictions.

Not an installed package (pyproject.toml lists only the pipeline's packages): it is importable
from the repository root, where pytest runs (``pythonpath = ["."]``) and where every benchmark
script puts itself on ``sys.path``. Nothing in the pipeline imports it.

* ``testkit.reference_combine``: per-example combiner solvers written straight from the definition;
* ``testkit.synthetic_predictions``: generalist predictions with planted confusable groups;
* ``testkit.cli``: a command run in the test process, and the one-line error it must end with.
"""
