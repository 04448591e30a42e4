"""Decentralized federated learning on Flower: DFedSAM and DFedSAM-MGS (Shi et al., ICML 2023) and
their baselines over gossip topologies. The ML lives in plain functions (`local_update`, the mixing
in `fedsam.mixing`) that the in-process engine and the Flower apps (`fedsam.client_app`, `fedsam.server_app`) share.

Submodules import `datasets`/`flwr-datasets` (data) and `flwr` (the apps) only where needed."""

from fedsam.algorithms import ALGORITHMS
from fedsam.config import FedConfig
from fedsam.topology import TOPOLOGIES, build_topology, metropolis_hastings, spectral_gap

__all__ = ["ALGORITHMS", "TOPOLOGIES", "FedConfig", "build_topology", "metropolis_hastings", "spectral_gap"]
