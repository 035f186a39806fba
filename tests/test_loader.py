"""The streaming loader: exactly-once epochs over uneven shards, exact and elastic mid-epoch resume, bad data, and
object storage behind a proxy that resets, refuses and stalls reads."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
import pytest
import s3fs
import torch
from faulty_proxy import FaultyProxy, serve_folder
from imaging import image_folder

from data_pipeline import make_loader
from data_pipeline.build.builder import BuildOptions, build
from data_pipeline.format.tar_writer import ShardWriter, sample_blocks
from data_pipeline.load.epoch_order import Cursor, EpochOrder, JobShape, Piece, planned_until, reshard, split
from data_pipeline.load.loader import LoaderStateError
from data_pipeline.load.remote import PrefetchedShard, ReadCounters, RetryingReader, RetryPolicy, ShardChangedError
from data_pipeline.load.shardlist import SourceError
from data_pipeline.load.stream import LoaderError

SAMPLES = 53  # over shards of at most 7: eight shards, the last one short
FAST_RETRY = RetryPolicy(backoff=0.01, max_retries=6)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    image_folder(root / "images", {"cat": 23, "dog": 17, "owl": 13})
    build(BuildOptions(input=str(root / "images"), output=str(root / "shards"), max_samples_per_shard=7, workers=0))
    return root / "shards"


def loader(shards: Path | str, **kwargs):
    options = {"batch_size": 4, "image_size": 32, "num_workers": 0, "seed": 7, "retry": FAST_RETRY, **kwargs}
    source = shards if isinstance(shards, str) else str(shards / "index.json")
    return make_loader(source, **options)


def valid_keys(batches) -> list[str]:
    return [key for batch in batches for key, valid in zip(batch["key"], batch["valid"], strict=True) if valid]


def fingerprint(batch) -> tuple:
    return tuple(batch["key"]), hashlib.sha1(batch["image"].numpy().tobytes()).hexdigest(), batch["label"].tolist()


def all_keys(shards: Path) -> set[str]:
    index = json.loads((shards / "index.json").read_text())
    assert index["splits"]["train"]["num_samples"] == SAMPLES
    return {key for batch in loader(shards, train=False) for key in batch["key"] if key}


# -- the epoch order ----------------------------------------------------------------------------------------------


def test_parts_cut_one_epoch_sequence_whatever_the_number_of_workers():
    order = EpochOrder((7, 7, 3, 0, 7, 1), seed=3, shuffle=True)
    sequence = [(p.shard, i) for p in order.pieces(0) for i in range(p.start, p.end)]
    assert len(sequence) == 25
    for workers in (1, 2, 3, 4, 6, 25):
        parts = [
            [(p.shard, i) for p in part for i in range(p.start, p.end)] for part in split(order.pieces(0), workers)
        ]
        assert [sample for part in parts for sample in part] == sequence
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert order.shard_order(0) != order.shard_order(1)


def test_a_ranks_workers_get_the_positions_its_stream_takes_from_them():
    shape = JobShape(world_size=1, workers=3, batch_size=4)
    # the rank's stream is worker 0's batch, worker 1's, worker 2's, worker 0's...: positions 0-3 from worker 0
    assert [shape.delivered_by(slot, 14) for slot in range(3)] == [4 + 2, 4, 4]
    pieces = [Piece(0, 5, 0, 10), Piece(0, 2, 3, 9)]  # an epoch of 16 samples beginning at position 2
    parts = shape.worker_parts(pieces, start=2)
    # positions 2-3 and 12-15 fall to worker 0, 4-7 and 16-17 to worker 1, 8-11 to worker 2
    assert parts == [[Piece(0, 5, 0, 6)], [Piece(0, 5, 6, 10), Piece(0, 2, 3, 5)], [Piece(0, 2, 5, 9)]]


def test_reshard_leaves_exactly_what_the_old_workers_had_left():
    order = EpochOrder((5, 9, 4, 6), seed=0, shuffle=True)
    shape = JobShape(world_size=3, workers=1, batch_size=2)
    old = [Cursor(slots=[None, None]) for _ in range(3)]
    planned = [planned_until(order, shape, worker, old[worker], 2) for worker in range(3)]
    # worker 0 is in the middle of its epoch-0 part, worker 1 already planned epoch 1, worker 2 has not started
    part0 = [p for p in planned[0].queue if p.epoch == 0]
    old[0] = Cursor(slots=[part0[0]._replace(start=part0[0].start + 2), None], queue=part0[1:], next_epoch=1)
    old[0].stream_start = sum(p.size for p in part0)
    part1 = [p for p in planned[1].queue if p.epoch == 1]
    old[1] = Cursor(slots=[part1[0]._replace(start=part1[0].start + 1), None], queue=part1[1:], next_epoch=2)
    old[1].stream_start = planned[1].stream_start

    def samples(pieces: list[Piece]) -> Counter:
        return Counter((p.epoch, p.shard, i) for p in pieces for i in range(p.start, p.end))

    expected = samples(old[0].pending() + old[1].pending())
    expected += samples(planned[2].pending() + [p for p in planned[0].queue if p.epoch == 1])
    for new in (JobShape(1, 1, 2), JobShape(2, 2, 3), JobShape(1, 5, 1)):
        cursors = reshard(order, shape, old, new, slots=2)
        assert sum((samples(c.pending()) for c in cursors), Counter()) == expected
        assert all(c.next_epoch == 2 for c in cursors)
        # on every new rank, all that is left of epoch 0 comes before any of epoch 1, as planned for its stream
        for rank in range(new.world_size):
            rank_cursors = cursors[rank * new.workers : (rank + 1) * new.workers]
            left0 = sum(p.size for c in rank_cursors for p in c.pending() if p.epoch == 0)
            for slot, cursor in enumerate(rank_cursors):
                assert sum(p.size for p in cursor.pending() if p.epoch == 0) == new.delivered_by(slot, left0)


# -- delivery ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (3, 2), (4, 1)])
def test_every_sample_once_and_equal_batch_counts_on_every_rank(shards: Path, world_size: int, num_workers: int):
    per_rank = []
    for rank in range(world_size):
        rank_loader = loader(shards, rank=rank, world_size=world_size, num_workers=num_workers, epochs=1)
        batches = list(rank_loader)
        assert len(batches) == len(rank_loader)
        per_rank.append(batches)
        counters = rank_loader.counters()
        assert counters["samples"] + counters["padding"] == 4 * len(batches)
        assert counters["skipped"] == {}
    assert len({len(batches) for batches in per_rank}) == 1
    keys = [key for batches in per_rank for key in valid_keys(batches)]
    assert len(keys) == SAMPLES and set(keys) == all_keys(shards)
    batch = per_rank[0][0]
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 32, 32)
    assert batch["label"].dtype == torch.int64


def rank_stream(batches: Iterator[dict], samples: int) -> list[tuple[str, int]]:
    """The first `samples` (key, epoch) pairs of a rank's batches."""
    stream: list[tuple[str, int]] = []
    while len(stream) < samples:
        batch = next(batches)
        assert bool(batch["valid"].all())  # a training loader runs on across epochs without padding
        stream += zip(batch["key"], batch["epoch"].tolist(), strict=True)
    return stream[:samples]


def share(samples: int, rank: int, world_size: int) -> int:
    return samples * (rank + 1) // world_size - samples * rank // world_size


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 1), (1, 4), (2, 2), (2, 3), (3, 4)])
def test_every_rank_delivers_its_share_of_an_epoch_before_any_of_the_next(
    shards: Path, world_size: int, num_workers: int
):
    epochs = 3
    seen = [Counter() for _ in range(epochs)]
    for rank in range(world_size):
        size = share(SAMPLES, rank, world_size)
        batches = iter(loader(shards, rank=rank, world_size=world_size, num_workers=num_workers))
        stream = rank_stream(batches, epochs * size)
        for epoch in range(epochs):
            window = stream[epoch * size : (epoch + 1) * size]
            assert {e for _, e in window} == {epoch}, (rank, epoch)
            seen[epoch].update(key for key, _ in window)
    for epoch in range(epochs):
        assert seen[epoch] == Counter(all_keys(shards)), epoch


def test_resumed_on_another_job_shape_every_rank_finishes_the_epoch_before_the_next(shards: Path):
    consumed, states = Counter(), []
    for rank in range(2):
        first = loader(shards, rank=rank, world_size=2, num_workers=2)
        batches = iter(first)
        consumed.update(key for key, epoch in rank_stream(batches, 4 * (3 + rank)) if epoch == 0)
        states.append(first.state_dict())
        del batches
    left = SAMPLES - sum(consumed.values())
    seen = Counter()
    for rank in range(3):
        resumed = loader(shards, rank=rank, world_size=3, num_workers=3, batch_size=3)
        resumed.load_state_dict(states)
        size = share(left, rank, 3)
        stream = rank_stream(iter(resumed), size + share(SAMPLES, rank, 3))
        assert {epoch for _, epoch in stream[:size]} == {0} and {epoch for _, epoch in stream[size:]} == {1}
        seen.update(key for key, _ in stream[:size])
    assert consumed + seen == Counter(all_keys(shards))


def test_same_seed_same_batches_other_seed_other_order(shards: Path):
    first = [fingerprint(b) for b in loader(shards, epochs=1)]
    again = [fingerprint(b) for b in loader(shards, epochs=1)]
    other = [fingerprint(b) for b in loader(shards, epochs=1, seed=8)]
    assert first == again
    assert [f[0] for f in first] != [f[0] for f in other]


# -- resume ------------------------------------------------------------------------------------------------------


def test_resume_with_the_same_world_size_gives_the_uninterrupted_batches(shards: Path):
    def rank_loader(rank: int):
        return loader(shards, rank=rank, world_size=2, num_workers=2)

    steps = 20  # over one epoch (14 batches per rank), into the next
    reference = []
    for rank in range(2):
        stream = iter(rank_loader(rank))
        reference.append([fingerprint(next(stream)) for _ in range(steps)])

    for stop in (3, 9):
        states = []
        for rank in range(2):
            first = rank_loader(rank)
            stream = iter(first)
            assert [fingerprint(next(stream)) for _ in range(stop)] == reference[rank][:stop]
            states.append(json.loads(json.dumps(first.state_dict())))  # as saved in a checkpoint
            del stream
        for rank in range(2):
            resumed = rank_loader(rank)
            resumed.load_state_dict(states)
            stream = iter(resumed)
            assert [fingerprint(next(stream)) for _ in range(steps - stop)] == reference[rank][stop:]


def small_buffer_loader(source: Path | str, **kwargs):
    """A buffer of 3 in shards of 7: a saved shuffle holds samples from the middle of its shard."""
    return loader(source, shuffle_buffer=3, open_shards=2, epochs=1, **kwargs)


def saved_after(stream_loader, batches: int) -> dict:
    stream = iter(stream_loader)
    for _ in range(batches):
        next(stream)
    return json.loads(json.dumps(stream_loader.state_dict()))  # as saved in a checkpoint


def test_a_resumed_piece_fetches_what_its_shuffle_held_and_reads_on_from_where_it_stopped(shards: Path):
    """The saved state names, per open shard, where its read stopped and the byte ranges of the samples its shuffle
    still held: a resume fetches those and reads on (fewer bytes than from the shard's start, or than from the oldest
    held sample as the release before did), and all three give the uninterrupted batches."""
    reference = [fingerprint(batch) for batch in small_buffer_loader(shards)]
    state = saved_after(small_buffer_loader(shards), 5)
    cursor = next(cursor for cursor in state["cursors"] if any(cursor["held"]))
    slot = next(i for i, held in enumerate(cursor["held"]) if held)
    place, offset = cursor["read_from"][slot]
    assert offset > 0 and all(sample_place < place for sample_place, _, _ in cursor["held"][slot]), cursor

    from_the_oldest = json.loads(json.dumps(state))  # the previous release's state: the oldest held sample
    for old in from_the_oldest["cursors"]:
        old["read_from"] = [held[0][:2] if held else None for held in old.pop("held")]
    from_the_start = json.loads(json.dumps(state))
    for old in from_the_start["cursors"]:
        old["read_from"] = [None] * len(old["read_from"])
    read = {}
    for name, saved in (("held", state), ("oldest", from_the_oldest), ("start", from_the_start)):
        resumed = small_buffer_loader(shards)
        resumed.load_state_dict(saved)
        assert [fingerprint(batch) for batch in resumed] == reference[5:], name
        read[name] = resumed.counters()["bytes"]
    assert read["held"] < read["oldest"] < read["start"], read


def test_held_samples_fetched_through_resets_503s_and_stalls_resume_exactly(shards: Path, s3: dict):
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3)
    fs.put(str(shards) + "/", "bucket/held/", recursive=True)
    url = "s3://bucket/held/index.json"
    reference = valid_keys(small_buffer_loader(url, storage_options=s3, num_workers=2))
    state = saved_after(small_buffer_loader(url, storage_options=s3, num_workers=2), 6)
    assert any(held for cursor in state["cursors"] for held in cursor["held"])
    with FaultyProxy(s3["endpoint_url"], every=2, stall_seconds=2.0) as proxy:
        options = {"endpoint_url": proxy.url, "config_kwargs": {"read_timeout": 0.5, "retries": {"max_attempts": 2}}}
        resumed = small_buffer_loader(url, storage_options=options, num_workers=2)
        resumed.load_state_dict(state)
        assert valid_keys(resumed) == reference[6 * 4 :]
    assert sum(proxy.injected.values()) > 0, proxy.injected


def test_resume_from_two_ranks_on_one_delivers_the_rest_of_the_epoch_once(shards: Path):
    consumed, states = [], []
    for rank in range(2):
        first = loader(shards, rank=rank, world_size=2, num_workers=2, epochs=1)
        stream = iter(first)
        consumed += valid_keys([next(stream) for _ in range(5 + rank)])
        states.append(first.state_dict())
        del stream
    resumed = loader(shards, rank=0, world_size=1, num_workers=2, epochs=1)
    resumed.load_state_dict(states)
    rest = valid_keys(resumed)
    assert len(consumed) + len(rest) == SAMPLES
    assert set(consumed) | set(rest) == all_keys(shards)
    # only the shards that were open are read again, never the whole epoch
    epoch_bytes = sum(shard["bytes"] for shard in json.loads((shards / "index.json").read_text())["shards"])
    assert resumed.counters()["bytes"] < epoch_bytes


def test_a_state_from_another_dataset_or_seed_is_refused(shards: Path):
    state = loader(shards).state_dict()
    with pytest.raises(LoaderStateError, match="seed 7"):
        loader(shards, seed=1).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="shuffle_buffer 256, this loader 64: resume with the shuffle_buffer"):
        loader(shards, shuffle_buffer=64).load_state_dict(state)
    state["shard_samples"] = [1, 2]
    with pytest.raises(LoaderStateError, match="another shard list"):
        loader(shards).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="all 2 old ranks"):
        loader(shards).load_state_dict([{**loader(shards, world_size=2).state_dict()}])
    with pytest.raises(LoaderStateError, match="with batches of 4, this one on 2 x 1 with batches of 8"):
        loader(shards, world_size=2, batch_size=8).load_state_dict([loader(shards, world_size=2).state_dict()])
    with pytest.raises(LoaderStateError, match="different shapes"):
        one_rank = loader(shards).state_dict()
        loader(shards, world_size=3).load_state_dict([loader(shards, world_size=2).state_dict(), one_rank])
    old_release = {**loader(shards).state_dict(), "format": "vit-pretrain-loader/1"}
    with pytest.raises(LoaderStateError, match="saved by another release"):
        loader(shards).load_state_dict(old_release)


# -- sources and bad data ----------------------------------------------------------------------------------------


def test_brace_pattern_with_and_without_an_index(shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    pattern = str(shards / "train-{000000..000007}.tar")
    with_index = valid_keys(loader(pattern, epochs=1))
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in shards.glob("train-*.tar"):
        shutil.copy(tar, bare / tar.name)
    without_index = valid_keys(loader(str(bare / "train-{000000..000007}.tar"), epochs=1))
    assert with_index == without_index and len(with_index) == SAMPLES
    assert "no index.json beside the shards" in caplog.text
    with pytest.raises(SourceError, match=r"index\.json URL or a brace pattern"):
        loader(str(shards / "nothing-here"))
    with pytest.raises(SourceError, match="no such file"):
        loader(str(tmp_path / "index.json"))


def _corrupt(shards: Path, target: Path) -> dict[str, int]:
    """Copy the shards and damage them; returns the samples each damage should cost."""
    shutil.copytree(shards, target)
    index = json.loads((target / "index.json").read_text())
    counts = {shard["name"]: shard["num_samples"] for shard in index["shards"]}
    # shard 0: one image replaced by garbage, one label out of range
    rewritten = ShardWriter(str(target / "train-000000.tar.new"))
    for n, sample in enumerate(_samples(target / "train-000000.tar")):
        if n == 0:
            sample["jpg"] = b"\xff\xd8 not really a jpeg"
        if n == 1:
            sample["cls"] = b"99"
        rewritten.add(sample_blocks(sample.pop("__key__"), sample))
    rewritten.close()
    os.replace(target / "train-000000.tar.new", target / "train-000000.tar")
    # shard 1: cut inside the first member of its third sample, so only the first sample is known to be whole
    tar = target / "train-000001.tar"
    with tarfile.open(tar) as archive:
        third = [member for member in archive.getmembers() if member.isreg()][6]
    tar.write_bytes(tar.read_bytes()[: third.offset_data + third.size // 2])
    # shard 2: gone
    (target / "train-000002.tar").unlink()
    return {
        "corrupt_image": 1,
        "bad_label": 1,
        "truncated_shard": counts["train-000001.tar"] - 1,
        "missing_shard": counts["train-000002.tar"],
    }


def _samples(tar: Path) -> list[dict]:
    import webdataset as wds

    return [
        {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
        for sample in wds.WebDataset(str(tar), shardshuffle=False)
    ]


def test_bad_samples_and_shards_are_skipped_and_counted(shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    expected = _corrupt(shards, tmp_path / "damaged")
    damaged = loader(tmp_path / "damaged", epochs=1, train=False, max_error_fraction=0.5)
    keys = valid_keys(damaged)
    skipped = damaged.counters()["skipped"]
    assert skipped == expected
    assert len(keys) == SAMPLES - sum(expected.values())
    assert "train-000002.tar: skipped missing_shard" in caplog.text

    strict = loader(tmp_path / "damaged", epochs=1, train=False, max_error_fraction=0.0)
    with pytest.raises(LoaderError, match=r"train-00000\d\.tar: \w+ .*max_error_fraction=0.0"):
        list(strict)


# -- object storage with faults -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_through_resets_503s_and_stalls_delivers_the_fault_free_sequence(shards: Path, s3: dict):
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3)
    fs.put(str(shards) + "/", "bucket/ds/", recursive=True)
    reference = valid_keys(loader("s3://bucket/ds/index.json", storage_options=s3, num_workers=2, epochs=1))
    assert len(reference) == SAMPLES
    with FaultyProxy(s3["endpoint_url"], every=2, stall_seconds=2.0) as proxy:
        options = {"endpoint_url": proxy.url, "config_kwargs": {"read_timeout": 0.5, "retries": {"max_attempts": 2}}}
        faulty = loader("s3://bucket/ds/index.json", storage_options=options, num_workers=2, epochs=1)
        assert valid_keys(faulty) == reference
    assert all(count > 0 for count in proxy.injected.values()), proxy.injected


@pytest.fixture
def http_server(shards: Path) -> Iterator[str]:
    with serve_folder(shards) as url:
        yield url


def test_http_reads_resume_at_the_byte_offset_after_faults(shards: Path, http_server: str):
    # fsspec's HTTP files do not retry a broken body themselves, so this exercises the loader's own retries
    reference = valid_keys(loader(f"{http_server}/index.json", epochs=1))
    with FaultyProxy(http_server, every=2, stall_seconds=1.0) as proxy:
        options = {"client_kwargs": {"timeout": __import__("aiohttp").ClientTimeout(sock_read=0.3)}}
        faulty = loader(f"{proxy.url}/index.json", epochs=1, storage_options=options)
        assert valid_keys(faulty) == reference
        assert faulty.counters()["retries"] >= sum(proxy.injected.values()) > 0


def test_a_byte_range_past_the_end_of_a_replaced_shard_fails_at_once_and_a_range_inside_it_reads(
    tmp_path: Path, s3: dict
) -> None:
    """A saved state names held samples by byte range; a shard replaced by a shorter one cannot hold them, and
    retrying with back-off (about 90 s with the default policy) would only delay the skip. S3 answers a range that
    starts past the end with 416, one that straddles it with fewer bytes; a local file gives fewer bytes for both."""
    data = os.urandom(1000)
    (tmp_path / "object").write_bytes(data)
    remote = s3fs.S3FileSystem(skip_instance_cache=True, **s3)
    remote.pipe("bucket/object", data)
    for fs, path in ((fsspec.filesystem("file"), str(tmp_path / "object")), (remote, "bucket/object")):
        for offset in (900, 1100):
            counters = ReadCounters()
            reader = RetryingReader(fs, path, "s3://bucket/object", RetryPolicy(), counters, offset=offset)
            with pytest.raises(ShardChangedError, match=rf"s3://bucket/object is 1000 bytes; the range {offset}-1200"):
                reader.read_range(1200)
            assert counters.retries == 0, (fs, offset)
        counters = ReadCounters()
        reader = RetryingReader(fs, path, "s3://bucket/object", RetryPolicy(), counters, offset=900)
        assert reader.read_range(1000) == data[900:] and counters.bytes == 100


def test_the_proxys_ranged_answers_break_like_its_whole_objects(shards: Path, http_server: str) -> None:
    """The benchmark's proxy answers ranges from its copy of an object: the bytes asked for, and under faults a 503,
    a stall and a reset (half of the range, then the connection closed), as for whole objects."""
    data = (shards / "train-000000.tar").read_bytes()
    assert len(data) > 4100

    def ranged_get(proxy: FaultyProxy) -> tuple[int | str, bytes]:
        host = urlsplit(proxy.url)
        connection = http.client.HTTPConnection(host.hostname, host.port, timeout=5)
        connection.request("GET", "/train-000000.tar", headers={"Range": "bytes=100-4099"})
        try:
            response = connection.getresponse()
            return response.status, response.read()
        except http.client.IncompleteRead as cut:
            return response.status, cut.partial
        except http.client.RemoteDisconnected:
            return "closed", b""
        finally:
            connection.close()

    with FaultyProxy(http_server, every=1, stall_seconds=0.2, serve_ranges=True) as proxy:
        answers = [ranged_get(proxy) for _ in range(4)]  # every GET is faulted: a 503, a stall, a reset, a 503
    assert [status for status, _ in answers] == [503, "closed", 206, 503]
    assert answers[2][1] == data[100:2100]
    with FaultyProxy(http_server, every=0, serve_ranges=True) as proxy:
        assert ranged_get(proxy) == (206, data[100:4100])


def test_a_prefetched_shard_reads_back_the_object_whatever_the_read_sizes(tmp_path: Path):
    # whole chunks are handed over without copying; partial reads, readinto and read-to-the-end still see every byte
    data = os.urandom(10_000)
    (tmp_path / "object").write_bytes(data)
    fs = fsspec.filesystem("file")

    def shard() -> PrefetchedShard:
        policy = RetryPolicy(chunk_size=1000)
        return PrefetchedShard(RetryingReader(fs, str(tmp_path / "object"), "object", policy, ReadCounters()))

    for sizes in ([1000] * 10, [4096] * 3, [300, 1000, 1000, 700, 5000, 2000], [999, 1, 1000]):
        stream, parts = shard(), []
        for size in sizes:
            parts.append(stream.read(size))
        parts.append(stream.read())
        assert b"".join(parts) == data and stream.read(1000) == b"", sizes
        stream.close()
    stream, buffer = shard(), bytearray(600)
    assert stream.readinto(buffer) == 600 and stream.read(1000) == data[600:1000]
    assert stream.read(1000) == data[1000:2000]
    stream.close()
