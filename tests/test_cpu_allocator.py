"""The caching CPU allocator (mambaclinix.ops.cpu_allocator): blocks are reused, bounded, released, and the
numbers computed with it are PyTorch's."""

from __future__ import annotations

import os
import platform
import shutil
import stat
import threading

import pytest
import torch
import torch.nn.functional as F

from mambaclinix.ops import cpu_allocator as ca

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="the caching allocator is compiled on Linux with a C++ compiler",
)

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Build the library (once per session) into a temporary cache folder, not the user's."""
    monkeypatch.setenv("MAMBACLINIX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "allocator-cache"))


@pytest.fixture
def caching():
    """The allocator enabled for one test, keeping every freed block (headroom=None) unless a test says
    otherwise, its peak restarted."""
    assert ca.enable_cpu_caching_allocator(headroom=None, strict=True)
    ca.empty_cpu_cache()
    yield
    ca.disable_cpu_caching_allocator()
    assert not ca.is_cpu_caching_allocator_enabled()


def test_freed_block_is_handed_out_again(caching):
    before = ca.cpu_caching_allocator_stats()
    a = torch.empty(3 * MIB, dtype=torch.uint8)  # 3 MiB: kept, rounded up to 4 MiB
    ptr = a.data_ptr()
    del a
    stats = ca.cpu_caching_allocator_stats()
    assert stats["cached_bytes"] == 4 * MIB
    b = torch.empty(4 * MIB - 5, dtype=torch.uint8)  # same rounded size: the same block
    assert b.data_ptr() == ptr
    after = ca.cpu_caching_allocator_stats()
    assert after["hits"] == before["hits"] + 1
    assert after["cached_bytes"] == 0 and after["live_bytes"] >= 4 * MIB


def test_block_serves_requests_up_to_half_its_size_only(caching):
    a = torch.empty(8 * MIB, dtype=torch.uint8)
    ptr = a.data_ptr()
    del a
    small = torch.empty(2 * MIB, dtype=torch.uint8)  # 8 MiB block is 4x the request: not taken
    assert small.data_ptr() != ptr
    half = torch.empty(4 * MIB, dtype=torch.uint8)  # 2x: taken, and returns as an 8 MiB block
    assert half.data_ptr() == ptr
    del half
    assert ca.cpu_caching_allocator_stats()["cached_bytes"] == 8 * MIB


def test_small_blocks_bypass_the_cache(caching):
    before = ca.cpu_caching_allocator_stats()
    x = torch.ones(1000)
    del x
    after = ca.cpu_caching_allocator_stats()
    assert (after["hits"], after["misses"], after["cached_bytes"]) == (before["hits"], before["misses"], 0)


def test_headroom_gives_kept_blocks_back_before_a_new_one(caching):
    live = ca.cpu_caching_allocator_stats()["live_bytes"]
    assert ca.enable_cpu_caching_allocator(headroom=0.0)
    a = torch.empty(8 * MIB, dtype=torch.uint8)
    del a  # kept; the most in use at once: live + 8 MiB
    b = torch.empty(2 * MIB, dtype=torch.uint8)  # live + 8 + 2 MiB > the peak: the 8 MiB block goes
    stats = ca.cpu_caching_allocator_stats()
    assert stats["evictions"] == 1 and stats["cached_bytes"] == 0
    assert stats["peak_live_bytes"] == live + 8 * MIB
    del b
    assert ca.enable_cpu_caching_allocator(headroom=0.5)  # 1.5 x peak: room for the 2 MiB one beside
    c = torch.empty(8 * MIB, dtype=torch.uint8)  # kept 2 MiB + new 8 MiB fit within 1.5 x (live + 8)
    assert ca.cpu_caching_allocator_stats()["evictions"] == 1
    del c
    with pytest.raises(ValueError, match="headroom"):
        ca.enable_cpu_caching_allocator(headroom=-0.1)


def test_limit_bounds_the_kept_bytes_and_empty_cache_releases(caching):
    ca.enable_cpu_caching_allocator(limit_bytes=6 * MIB, headroom=None)
    a, b = torch.empty(4 * MIB, dtype=torch.uint8), torch.empty(4 * MIB, dtype=torch.uint8)
    del a, b  # the second one would exceed 6 MiB: freed at once
    assert ca.cpu_caching_allocator_stats()["cached_bytes"] == 4 * MIB
    assert ca.empty_cpu_cache() == 4 * MIB
    assert ca.cpu_caching_allocator_stats()["cached_bytes"] == 0
    with pytest.raises(ValueError, match="limit_bytes"):
        ca.enable_cpu_caching_allocator(limit_bytes=-1)


def test_tensors_outlive_disable():
    assert ca.enable_cpu_caching_allocator(strict=True)
    a = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB, from the caching allocator
    assert ca.disable_cpu_caching_allocator()
    assert not ca.is_cpu_caching_allocator_enabled()
    assert float(a[-1]) == (1 << 20) - 1  # still readable
    del a  # freed through the allocator's deleter, not kept
    assert ca.cpu_caching_allocator_stats()["cached_bytes"] == 0
    assert not ca.disable_cpu_caching_allocator()


def test_train_steps_equal_pytorch_allocator():
    """Two steps of a conv net (reused blocks hold the last step's values) give the same numbers."""

    def run():
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv3d(2, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(16, 3, 1)
        )
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x, y = torch.randn(2, 2, 24, 24, 24), torch.randint(0, 3, (2, 24, 24, 24))
        losses = []
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in net.parameters()]

    ref_losses, ref_params = run()
    assert ca.enable_cpu_caching_allocator(strict=True)
    try:
        losses, params = run()
        assert ca.cpu_caching_allocator_stats()["hits"] > 0
    finally:
        ca.disable_cpu_caching_allocator()
    assert losses == ref_losses
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_threads_allocate_and_free_concurrently(caching):
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            for _ in range(50):
                t = torch.rand(1 << 19, generator=g) + seed  # 2 MiB each
                assert float(t.min()) >= seed
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = ca.cpu_caching_allocator_stats()
    assert stats["live_bytes"] == 0 or stats["live_bytes"] < 64 * MIB


def test_dataloader_workers_fork_with_it(caching):
    class Big(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((1 << 19,), float(i))  # 2 MiB, allocated in the forked worker

    loader = torch.utils.data.DataLoader(Big(), batch_size=2, num_workers=2, multiprocessing_context="fork")
    sums = [b.sum(dim=1).tolist() for b in loader]
    assert sums == [[0.0, float(1 << 19)], [2.0 * (1 << 19), 3.0 * (1 << 19)]]


def test_build_error_is_reported(tmp_path, monkeypatch):
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\necho 'fatal error: no headers here' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("MAMBACLINIX_CACHE_DIR", str(tmp_path / "cache"))
    ca._library.cache_clear()
    try:
        with pytest.raises(ca.AllocatorBuildError, match="no headers here"):
            ca.enable_cpu_caching_allocator(strict=True)
        assert ca.enable_cpu_caching_allocator() is False  # not strict: says why in the log, returns False
        assert not os.listdir(tmp_path / "cache")  # no half-written library left behind
    finally:
        ca._library.cache_clear()


def test_command_enables_it_unless_told_otherwise(monkeypatch, capsys):
    from mambaclinix import cli

    monkeypatch.setenv(cli.CPU_ALLOCATOR_ENV, "system")
    assert cli.use_cpu_allocator() is False
    assert not ca.is_cpu_caching_allocator_enabled()

    monkeypatch.setenv(cli.CPU_ALLOCATOR_ENV, "jemalloc")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["fit", "--trainer.max_epochs", "1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "MAMBACLINIX_CPU_ALLOCATOR='jemalloc' is not a CPU allocator" in err and "caching, system" in err
    assert not ca.is_cpu_caching_allocator_enabled()

    monkeypatch.delenv(cli.CPU_ALLOCATOR_ENV)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["export", "--help"])  # help: nothing runs, the allocator stays PyTorch's
    assert exit_info.value.code == 0
    assert not ca.is_cpu_caching_allocator_enabled()
    try:
        assert cli.use_cpu_allocator() is True
        assert ca.is_cpu_caching_allocator_enabled()
    finally:
        ca.disable_cpu_caching_allocator()
