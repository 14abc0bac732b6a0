"""Attribution methods behind one interface, so that fastreplay's exact scores and the methods a
user would pick instead are held against the same retrainings (`fastreplay compare`).

A method scores test targets against every training example, (K, N), in fastreplay's
convention: d(measurement of target k) / d(weight of training example i), so that for a loss
measurement a helpful example has a negative score. ``magic`` reads the scores `fastreplay magic`
stored; ``gradsim`` is computed here; the peers come from their own libraries
(``pip install 'fastreplay[peers]'``): TRAK (traker), EK-FAC and K-FAC (kronfluence), influence
functions with conjugate gradients or LiSSA and TracIn (dattri), each imported only when asked
for and converted to this convention once (peers.py).
"""
from .base import METHODS, Method, PeerContext, method_names, resolve_methods

__all__ = ["METHODS", "Method", "PeerContext", "method_names", "resolve_methods"]
