"""Small helpers shared by several test files."""
import pytest
import torch

import checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Import into a test module to run it on one torch thread: its models are tiny, OpenMP's hand-offs cost more
    than their ops, and the tests share a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(model, seed):
    """Every weight random and larger than transformers' init (std 0.02): std 0.3, norm weights near 1, so tiny
    encoders tell images apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.3 * torch.randn(p.shape, generator=g)
            p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def killed_after_first_checkpoint(monkeypatch, run) -> None:
    """Call `run()` as a process that is killed right after it writes its first checkpoint."""
    real_save = checkpoint.save_checkpoint

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
