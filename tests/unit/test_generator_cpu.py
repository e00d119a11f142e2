"""The CPU engine leaves the trainer's torch thread count and `torch.set_num_threads` intact."""

import torch

from rlx.generator.base import TorchThreads


def test_building_restores_set_num_threads_and_the_count():
    before = torch.get_num_threads()
    threads = TorchThreads()
    real = torch.set_num_threads
    try:
        with threads.building():  # what vLLM's CPU worker does while the engine is built
            torch.set_num_threads(1)
            torch.set_num_threads = lambda n: None
        assert torch.set_num_threads is real
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads = real
        torch.set_num_threads(before)
