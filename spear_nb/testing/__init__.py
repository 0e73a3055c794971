"""Test and demo infrastructure: a local Kubernetes API server.

:class:`LocalKubeAPI` serves the pod part of the Kubernetes API over real HTTP on
loopback and runs pods as local processes, so that the Kubernetes runtime (and
the ``kubernetes`` client under it) can be tried without a cluster: in tests, in
notebooks, on Binder. Its docstring lists exactly what it emulates. It needs only
the standard library.
"""

from __future__ import annotations

from spear_nb.testing._kubeapi import LocalKubeAPI

__all__ = ["LocalKubeAPI"]
