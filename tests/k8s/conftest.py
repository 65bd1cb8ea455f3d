"""The `k8s_cluster` fixture: a real control plane from kwokctl (see cluster.py).

Other test directories get the same fixture, and the same cluster, with:

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "k8s"))  # path to this dir
    from cluster import k8s_cluster, pytest_collection_finish, pytest_terminal_summary

e2e/conftest.py does exactly that.
"""

from cluster import (  # type: ignore[import-not-found, unused-ignore]
    k8s_cluster,
    pytest_collection_finish,
    pytest_terminal_summary,
)

__all__ = ["k8s_cluster", "pytest_collection_finish", "pytest_terminal_summary"]
