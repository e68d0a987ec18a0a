"""Data-parallel CPU training: the ranks' summed, weighted gradients are the global batch's, failures
surface, and a data-parallel pretraining run resumes exactly."""

import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import smoke_config
from rlhf_tts.checkpoint import latest_checkpoint, load_checkpoint
from rlhf_tts.training import data_parallel
from rlhf_tts.training.data_parallel import Ranks, loopback_interface, run_ranks


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 6, generator=g), torch.randn(7, 1, generator=g)


def _gradients(ranks: Ranks) -> list[torch.Tensor]:
    """Each rank: its share of a 7-item batch, loss weighted by that share, gradients summed."""
    model, (x, y) = _model(), _batch()
    index = ranks.shard(list(range(len(x))))
    ranks.backward((model(x[index]) - y[index]).pow(2).mean(), len(index) / len(x), list(model.parameters()))
    grads = [p.grad.clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads, ranks.gather(grads)[0]))  # every rank holds the same sum
    return grads


def _fails_on_rank_1(ranks: Ranks) -> None:
    if ranks.rank == 1:
        raise ValueError("rank 1 broke")
    torch.distributed.all_reduce(torch.zeros(1))  # rank 0 waits on a rank that is gone


def test_summed_weighted_shares_are_the_global_batch_gradient():
    model, (x, y) = _model(), _batch()
    (model(x) - y).pow(2).mean().backward()
    expected = [p.grad for p in model.parameters()]
    for world in (2, 3):  # 7 items: uneven shares are weighted by their sizes
        got = run_ranks(_gradients, world, ())
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected)), world
    assert all(torch.equal(a, b) for a, b in zip(run_ranks(_gradients, 1, ()), expected))
    assert torch.get_num_threads() >= 1


def test_shard_strides_and_one_rank_is_the_identity():
    assert Ranks(1, 3).shard(list(range(8))) == [1, 4, 7]
    assert Ranks().shard([3, 1]) == [3, 1] and Ranks().gather("x") == ["x"]


@pytest.mark.timeout(120)
def test_a_failing_rank_fails_the_run_instead_of_hanging():
    with pytest.raises(RuntimeError, match="rank 1 exit code 1"):
        run_ranks(_fails_on_rank_1, 2, ())


@pytest.mark.slow
def test_data_parallel_pretraining_resumes_exactly_and_keys_apart(smoke_dataset, tmp_path):
    from rlhf_tts.training.pretrain import base_model_location, run_pretraining

    _, dataset = smoke_dataset
    overrides = ["pretrain.steps=6", "pretrain.checkpoint_every=3", "pretrain.sample_every=100",
                 "pretrain.data_parallel=2"]
    cfg_a = smoke_config(tmp_path / "a", *overrides)
    base_a = run_pretraining(cfg_a, dataset.directory)
    one_process = smoke_config(tmp_path / "a", *overrides[:-1])
    assert base_model_location(one_process).directory != base_a.directory  # another model, another key
    saved = load_checkpoint(latest_checkpoint(base_a.directory / "checkpoints"))
    assert {k for k in saved.tensors if k.startswith("rng/")} == {
        "rng/rank0/torch", "rng/rank0/batch", "rng/rank1/torch", "rng/rank1/batch"}
    assert saved.state["ranks"] == 2

    cfg_b = smoke_config(tmp_path / "b", *overrides)
    run_pretraining(cfg_b, dataset.directory, stop_after=4)  # dies after step 4: resumes from step 3
    base_b = run_pretraining(cfg_b, dataset.directory, resume=True)
    weights_a = load_file(str(base_a.final / "tensors.safetensors"))
    weights_b = load_file(str(base_b.final / "tensors.safetensors"))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)  # bit-identical to uninterrupted


@pytest.mark.slow
def test_data_parallel_easpm_resumes_exactly(smoke_dataset, tmp_path):
    from rlhf_tts.training.easpm import easpm_location, train_easpm
    from rlhf_tts.training.pretrain import run_pretraining

    shared, dataset = smoke_dataset
    run_pretraining(shared, dataset.directory)  # the session's smoke base model

    def config(name: str):  # noqa: ANN202
        cache = tmp_path / name / "cache"
        cache.mkdir(parents=True)
        for stage in ("corpus", "data", "pretrain"):
            (cache / stage).symlink_to(Path(shared.cache_dir) / stage)
        return smoke_config(tmp_path / name, "easpm.data_parallel=2")

    cfg_a = config("a")
    location_a, curve = train_easpm(cfg_a)
    assert curve["pair_accuracy"] and load_checkpoint(latest_checkpoint(location_a.checkpoints)).state["ranks"] == 2
    cfg_b = config("b")
    train_easpm(cfg_b, stop_after=5)  # dies after step 5: resumes from step 4
    location_b, _ = train_easpm(cfg_b, resume=True)
    one_process = easpm_location(smoke_config(tmp_path / "a")).directory.name
    assert location_b.directory.name == location_a.directory.name != one_process
    weights_a = load_file(str(location_a.final / "tensors.safetensors"))
    weights_b = load_file(str(location_b.final / "tensors.safetensors"))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_loopback_interface_is_named_per_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    """gloo is pinned to the loopback interface by its platform name (Linux `lo`, macOS `lo0`); an
    unlisted platform leaves gloo's own choice."""
    for table, expected in (([(1, "lo"), (2, "eth0")], "lo"), ([(1, "lo0"), (4, "en0")], "lo0"),
                            ([(2, "eth0")], None)):
        monkeypatch.setattr(data_parallel.socket, "if_nameindex", lambda table=table: table)
        assert loopback_interface() == expected
    monkeypatch.delattr(data_parallel.socket, "if_nameindex")
    assert loopback_interface() is None
    monkeypatch.undo()
    assert loopback_interface() in {name for _, name in socket.if_nameindex()}
