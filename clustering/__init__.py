"""Stage 2: confusable class groups from the covariance of the generalist's held-out predictions.

``python -m clustering.build --k 300`` (or ``specdistill cluster``) writes ``clustering/clusters.json``
and two pictures into the run directory. The pieces, one concept per module:

``predictions``  read and check probabilities / log-probabilities, dense or top-k sparse
``matrices``     covariance and its better-conditioned variants, as products that never form C
``sketch``       the scalable path: k-means on a Gaussian sketch of the matrix's columns
``kmeans``       scikit-learn (KMeans, MiniBatchKMeans) and faiss backends
``overlap``      drop small groups, grow groups to a fixed size, coverage histogram
``cluster``      the whole computation on arrays (:func:`cluster_classes`)
``plots``        the reordered matrix heatmap and the example groups
``build``        the stage: run directory in, clusters.json out (:func:`run_clustering`)
"""

from clustering.cluster import ClusterResult, cluster_classes

__all__ = ["ClusterResult", "cluster_classes"]
