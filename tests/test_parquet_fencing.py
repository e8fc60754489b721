"""Part files get their final names only after their checkpoint committed (zombie fencing).

A featurizer frozen past its session timeout (SIGSTOP, a GC pause, a cut-off host) loses its
partitions; when it runs on, it may still write the part file of the checkpoint it was in.
Before, that file had its final name at once and could replace the new owner's file of the
same first offset (rows lost, or rows repeated in the owner's next file). Now the sink stages
files under hidden names, the worker publishes them after the commit (which a zombie's is
refused), and a newly assigned partition publishes what a committed-then-dead writer left and
removes every other staged file. Real Parquet, local disk and the project's local S3 server;
the same story on a real cluster is tests/faults/test_cluster.py's zombie scenario.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import storage
from pipeline.storage.parquet_reader import feature_files, read_features
from pipeline.storage.parquet_sink import ParquetSink
from tests.claim_check_servers import s3  # noqa: F401 (a fixture: the project's local S3 server)
from tests.test_parquet import META, names, prow, root, tp  # noqa: F401 (root: a fixture, local and S3)


def _ids(root_location: str) -> list[str]:
    return sorted(read_features([root_location]).image_ids) if feature_files([root_location]) else []


def _expected(*offsets: range) -> list[str]:
    return sorted(prow(i).image_id for r in offsets for i in r)


def _staged_names(root_location: str) -> list[str]:
    fs, path = storage.resolve(root_location)
    from pyarrow import fs as pafs

    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(f.base_name for f in found if f.base_name.startswith(".staged-"))


def test_a_staged_part_is_invisible_until_published(root):
    sink = ParquetSink(root, META)
    sink.add([prow(i) for i in range(3, 6)])
    (staged,) = sink.stage({tp(0): 3}, {tp(0): 6})
    assert Path(str(staged)).name.startswith(f".staged-deeper.images+0+{3:019d}+{6:019d}-")
    assert names(root) == [] and _ids(root) == []  # readers and *.parquet globs see nothing yet
    (final,) = sink.publish()
    assert Path(str(final)).name == f"deeper.images+0+{3:019d}.parquet"
    assert _ids(root) == _expected(range(3, 6)) and _staged_names(root) == []


def test_a_failed_checkpoint_removes_its_staged_parts(root):
    sink = ParquetSink(root, META)
    sink.add([prow(0), prow(1)])
    sink.stage({tp(0): 0}, {tp(0): 2})
    sink.discard()  # the commit failed (or was refused)
    assert _staged_names(root) == [] and names(root) == [] and len(sink) == 0
    assert sink.publish() == []  # nothing of the failed checkpoint is ever published


def test_a_zombie_cannot_replace_the_new_owners_part(root):
    """The zombie stages offsets 10-13 after the new owner committed 10-15 and 16-17."""
    zombie, owner = ParquetSink(root, META), ParquetSink(root, META)
    zombie.add([prow(i) for i in range(10, 14)])  # buffered when it froze; committed offset was 10
    assert owner.recover({tp(0): 10}) == ([], [])
    owner.add([prow(i) for i in range(10, 16)])
    owner.stage({tp(0): 10}, {tp(0): 16})
    owner.publish()
    owner.add([prow(16), prow(17)])
    owner.stage({tp(0): 16}, {tp(0): 18})
    owner.publish()
    zombie.stage({tp(0): 10}, {tp(0): 14})  # it runs on: its checkpoint writes...
    zombie.discard()  # ...and its commit is refused (KIP-447 generation check)
    assert _ids(root) == _expected(range(10, 18)) and len(names(root)) == 2
    zombie.add([prow(i) for i in range(10, 14)])
    zombie.stage({tp(0): 10}, {tp(0): 14})  # frozen again before it could discard: left behind
    published, removed = ParquetSink(root, META).recover({tp(0): 18})  # the next assignment tidies up
    assert published == [] and len(removed) == 1 and _staged_names(root) == []
    assert _ids(root) == _expected(range(10, 18))


def test_a_zombie_part_ending_at_the_committed_offset_is_not_published(root):
    """Its range ends where the owner's commits end, but a published part already starts at or
    after its first offset: it overlaps committed parts and is removed, never renamed."""
    owner = ParquetSink(root, META)
    for start, end in ((20, 24), (24, 30)):
        owner.add([prow(i) for i in range(start, end)])
        owner.stage({tp(0): start}, {tp(0): end})
        owner.publish()
    zombie = ParquetSink(root, META)
    zombie.add([prow(i) for i in range(20, 30)])
    zombie.stage({tp(0): 20}, {tp(0): 30})
    published, removed = ParquetSink(root, META).recover({tp(0): 30})
    assert published == [] and len(removed) == 1
    assert _ids(root) == _expected(range(20, 30)) and len(names(root)) == 2


def test_recover_publishes_what_a_writer_committed_but_could_not_rename(root):
    """The writer died (or froze) between its commit and its rename: the next owner renames it,
    and the old writer's late rename finds the work done."""
    first = ParquetSink(root, META)
    first.add([prow(i) for i in range(0, 4)])
    first.stage({tp(0): 0}, {tp(0): 4})
    first.publish()
    first.add([prow(i) for i in range(4, 9)])
    first.stage({tp(0): 4}, {tp(0): 9})  # committed up to 9, then it died before publish()
    stray = ParquetSink(root, META)
    stray.add([prow(i) for i in range(4, 7)])
    stray.stage({tp(0): 4}, {tp(0): 7})  # an uncommitted attempt at the same offsets
    published, removed = ParquetSink(root, META).recover({tp(0): 9})
    assert [Path(str(p)).name for p in published] == [f"deeper.images+0+{4:019d}.parquet"]
    assert len(removed) == 1 and _staged_names(root) == []
    assert _ids(root) == _expected(range(0, 9))
    assert [Path(str(p)).name for p in first.publish()] == [f"deeper.images+0+{4:019d}.parquet"]  # no error
    assert _ids(root) == _expected(range(0, 9))


def test_a_failed_rename_is_retried_and_nothing_is_lost(tmp_path, monkeypatch):
    root_location = str(tmp_path / "features")
    sink = ParquetSink(root_location, META)
    sink.add([prow(0), prow(1)])
    sink.stage({tp(0): 0}, {tp(0): 2})
    real_move = storage.move

    def broken(*args):
        raise storage.StorageError("disk went away")

    monkeypatch.setattr(storage, "move", broken)
    try:
        sink.publish()
    except storage.StorageError:
        pass
    assert sink.unpublished() and names(root_location) == []
    monkeypatch.setattr(storage, "move", real_move)
    sink.add([prow(2)])
    sink.stage({tp(0): 2}, {tp(0): 3})  # a later checkpoint, not committed yet...
    sink.discard()  # ...fails: the committed part of the earlier one must survive that
    assert sink.unpublished()
    assert len(sink.publish()) == 1 and not sink.unpublished()
    assert _ids(root_location) == _expected(range(0, 2))


def test_a_late_recover_with_an_old_offset_destroys_nothing(root):
    """A zombie arms the partition with the committed offset it last saw (10) after the new owner
    committed up to 18 and staged its next checkpoint: nothing of the owner's may go."""
    owner = ParquetSink(root, META)
    for start, end in ((10, 16), (16, 18)):
        owner.add([prow(i) for i in range(start, end)])
        owner.stage({tp(0): start}, {tp(0): end})
        owner.publish()
    owner.add([prow(i) for i in range(18, 22)])
    owner.stage({tp(0): 18}, {tp(0): 22})  # not committed yet
    assert ParquetSink(root, META).recover({tp(0): 10}) == ([], [])
    assert len(_staged_names(root)) == 1 and len(names(root)) == 2
    owner.publish()  # the owner's commit went through
    assert _ids(root) == _expected(range(10, 22))
