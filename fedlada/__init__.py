"""FedLaDa: federated reasoning distillation with learnability-aware data allocation (LaDa).

The library never imports ``flwr``; the Flower app lives in ``fedlada_app``.
"""

__version__ = "0.1.0"
