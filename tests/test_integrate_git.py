"""The git layer of a round (src/stacklab/integrate/gitrepo.py), on tiny repositories built in
tmp_path: refs, changes and their hunks, sequential merges, conflicts and their line ranges,
exports, and that the user's repository never gets a new object."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from stacklab.integrate import gitrepo
from stacklab.integrate.gitrepo import Conflict, GitError, MergeConflict, Repo, check_git

LINES = [f"line {i} = {i}" for i in range(1, 61)]


def git(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, check=True
    )
    return done.stdout.strip()


def write(repo: Path, lines: list[str], name: str = "train.py") -> None:
    path = repo / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def edit(lines: list[str], first: int, last: int, tag: str) -> list[str]:
    """Lines first..last (1-based, inclusive) rewritten with `tag`."""
    out = list(lines)
    for i in range(first, last + 1):
        out[i - 1] = f"line {i} = {tag}"
    return out


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def branch(repo: Path, name: str, lines: list[str], start: str = "main") -> str:
    git(repo, "checkout", "-q", "-b", name, start)
    write(repo, lines)
    sha = commit(repo, name)
    git(repo, "checkout", "-q", "main")
    return sha


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "trainer"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "Test")
    git(path, "config", "user.email", "test@example.org")
    write(path, LINES)
    (path / "README").write_text("trainer\n")
    commit(path, "base")
    return path


def open_repo(repo: Path, tmp_path: Path, objects: str = "objects") -> Repo:
    return Repo(repo, tmp_path / "out" / objects, name="../trainer")


def object_files(repo: Path) -> list[str]:
    return sorted(str(p) for p in (repo / ".git" / "objects").rglob("*") if p.is_file())


def test_check_git_needs_2_38_and_says_so(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tuple(int(x) for x in check_git().split(".")[:2]) >= (2, 38)
    assert gitrepo.parse_git_version("git version 2.39.5 (Apple Git-143)") == (2, 39, 5)
    monkeypatch.setattr(gitrepo, "parse_git_version", lambda text: (2, 30, 1))
    pattern = (
        r"^git 2\.30\.1 found at \S*git; stacklab needs git >= 2\.38 "
        r"for merge-tree --write-tree$"
    )
    with pytest.raises(GitError, match=pattern):
        check_git()
    with pytest.raises(GitError, match=pattern):
        open_repo(repo, tmp_path)


def test_a_folder_that_is_not_a_repository_top_is_an_error(repo: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(GitError, match=r"^\S*plain is not a git repository$"):
        Repo(plain, tmp_path / "objects")
    (repo / "sub").mkdir()
    with pytest.raises(GitError, match="sub is not the top folder of a git repository"):
        Repo(repo / "sub", tmp_path / "objects")
    with pytest.raises(GitError, match="repository nowhere not found"):
        Repo(tmp_path / "nowhere", tmp_path / "objects", name="nowhere")


def test_resolve_names_a_missing_ref_and_the_repository(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git(repo, "tag", "-a", "v1", "-m", "an annotated tag")
    elsewhere = tmp_path / "elsewhere"
    git(tmp_path, "init", "-q", str(elsewhere))
    monkeypatch.setenv("GIT_DIR", str(elsewhere / ".git"))  # as inside a git hook: ignored
    r = open_repo(repo, tmp_path)
    assert r.resolve("main") == git(repo, "rev-parse", "main")
    assert r.resolve("v1") == r.resolve(r.resolve("main")) == r.resolve("main")
    assert r.tree(r.resolve("main")) == git(repo, "rev-parse", "main^{tree}")
    with pytest.raises(GitError, match=r"^no commit 'feature/x' in repository \.\./trainer$"):
        r.resolve("feature/x")
    with pytest.raises(
        GitError, match=r"^c/x\.yaml: git: no commit 'feature/x' in repository \.\./trainer$"
    ):
        r.change(r.resolve("main"), "feature/x", source="c/x.yaml: git")
    # a tree is not a commit
    with pytest.raises(GitError, match="no commit"):
        r.resolve(git(repo, "rev-parse", "main^{tree}"))


def test_uncommitted_changes_count_only_while_base_is_checked_out(
    repo: Path, tmp_path: Path
) -> None:
    r = open_repo(repo, tmp_path)
    base = r.resolve("main")
    assert r.uncommitted_at(base) == []
    write(repo, edit(LINES, 3, 3, "dirty"))  # not staged
    git(repo, "mv", "README", "README.md")  # a staged rename: both paths change
    (repo / "untracked.txt").write_text("ignored: not tracked\n")
    index = (repo / ".git" / "index").read_bytes()
    assert r.uncommitted_at(base) == ["README", "README.md", "train.py"]
    assert (repo / ".git" / "index").read_bytes() == index  # status wrote nothing
    git(repo, "stash", "-q")  # the test repository's own state, not /work/main's
    git(repo, "checkout", "-q", "-b", "other")
    write(repo, edit(LINES, 1, 1, "other"))
    commit(repo, "other")
    write(repo, edit(LINES, 2, 2, "dirty on other"))
    assert r.uncommitted_at(base) == []  # base is not what is checked out


def test_change_reports_files_diffstat_and_base_side_hunks(repo: Path, tmp_path: Path) -> None:
    lines = edit(LINES, 10, 12, "a")
    lines.insert(30, "inserted after 30")  # a pure insertion after line 30
    del lines[50]  # line 50 (index 50 after the insertion)
    git(repo, "checkout", "-q", "-b", "feature/a")
    write(repo, lines)
    write(repo, ["new"], "data dir/new file.txt")
    (repo / "README").unlink()
    commit(repo, "a")
    git(repo, "checkout", "-q", "main")
    r = open_repo(repo, tmp_path)
    base = r.resolve("main")
    c = r.change(base, "feature/a")
    assert c.ref == "feature/a"
    assert c.commit == git(repo, "rev-parse", "feature/a")
    assert c.merge_base == base
    assert c.files == ("README", "data dir/new file.txt", "train.py")
    assert c.hunks == {
        "README": [(1, 1)],
        "data dir/new file.txt": [(1, 1)],
        "train.py": [(10, 12), (30, 30), (50, 50)],
    }
    assert (c.insertions, c.deletions) == (5, 5)  # 3 + 1 in train.py, 1 new file; 3 + 1 + 1
    assert "train.py" in c.diffstat and "3 files changed" in c.diffstat


def test_unrelated_history_is_an_error(repo: Path, tmp_path: Path) -> None:
    git(repo, "checkout", "-q", "--orphan", "island")
    commit(repo, "island")
    git(repo, "checkout", "-q", "main")
    r = open_repo(repo, tmp_path)
    with pytest.raises(GitError, match=r"^x\.yaml: 'island' shares no history with base main"):
        r.change(r.resolve("main"), "island", source="x.yaml")


def test_clean_merges_keep_both_edits_and_are_deterministic(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    branch(repo, "a", edit(LINES, 5, 6, "a"))
    branch(repo, "b", edit(LINES, 40, 41, "b"))
    branch(repo, "c", edit(LINES, 58, 58, "c"))
    r = open_repo(repo, tmp_path)
    base = r.resolve("main")
    a, b, c = (r.change(base, ref) for ref in "abc")
    assert r.merge(base, []) == r.tree(base)
    assert r.merge(base, [a]) == r.tree(a.commit)  # a descends from base: the same code
    tree = r.merge(base, [a, b])
    text = r.read(tree, "train.py")
    assert text is not None
    assert "line 5 = a" in text and "line 40 = b" in text and "line 58 = 58" in text
    assert r.merge(base, [a, b]) == tree
    assert r.conflict(base, a, b) is None
    r.can_apply(base, a)
    # Clean merges commute in content; the merge commits record the order.
    assert r.merge(base, [b, a]) == tree
    assert r.merge_commit(base, [b, a]) != r.merge_commit(base, [a, b])
    # Another engine, with its own object folder, builds the very same commits.
    other = open_repo(repo, tmp_path, "other-objects")
    assert other.merge_commit(base, [a, b]) == r.merge_commit(base, [a, b])
    # Prefixes are memoised: [a, b, c] after [a, b] is one more merge.
    calls: list[tuple[str, str]] = []
    merge_one = Repo._merge_one

    def counting(self: Repo, parent: str, commit: str) -> str | tuple[str, ...]:
        calls.append((parent, commit))
        return merge_one(self, parent, commit)

    monkeypatch.setattr(Repo, "_merge_one", counting)
    full = r.merge(base, [a, b, c])
    assert calls == [(r.merge_commit(base, [a, b]), c.commit)]
    assert "line 58 = c" in (r.read(full, "train.py") or "")


def test_a_branch_on_top_of_another_merges_in_either_order(repo: Path, tmp_path: Path) -> None:
    branch(repo, "a", edit(LINES, 5, 6, "a"))
    branch(repo, "a-plus", edit(edit(LINES, 5, 6, "a"), 20, 20, "plus"), start="a")
    r = open_repo(repo, tmp_path)
    base = r.resolve("main")
    a, plus = r.change(base, "a"), r.change(base, "a-plus")
    assert r.merge(base, [a, plus]) == r.merge(base, [plus, a]) == r.tree(plus.commit)


def test_conflicting_branches_name_each_other_and_the_lines(repo: Path, tmp_path: Path) -> None:
    branch(repo, "feature/a", edit(LINES, 40, 52, "a"))
    branch(repo, "feature/b", edit(LINES, 40, 52, "b"))
    branch(repo, "feature/c", edit(LINES, 45, 45, "c"))
    branch(repo, "clean", edit(LINES, 1, 2, "clean"))
    r = open_repo(repo, tmp_path)
    base = r.resolve("main")
    a, b, c, clean = (r.change(base, x) for x in ("feature/a", "feature/b", "feature/c", "clean"))
    found = r.conflict(base, a, b)
    assert found == Conflict(a="feature/a", b="feature/b", files={"train.py": [(40, 52)]})
    assert found.describe() == "both change train.py lines 40-52"
    one = r.conflict(base, a, c)
    assert one is not None and one.describe() == "both change train.py line 45"
    assert r.conflict(base, a, clean) is None
    with pytest.raises(MergeConflict) as caught:
        r.merge(base, [clean, a, b])
    assert str(caught.value) == (
        "'feature/b' conflicts with 'feature/a' in repository ../trainer: "
        "both change train.py lines 40-52"
    )
    assert caught.value.conflict == found
    assert caught.value.others == ("feature/a",)
    # The conflict is memoised too, and raised again for longer subsets.
    with pytest.raises(MergeConflict, match="'feature/b' conflicts with 'feature/a'"):
        r.merge(base, [clean, a, b, c])


def test_several_files_and_ranges_are_described_in_one_line() -> None:
    conflict = Conflict(
        a="x",
        b="y",
        files={"train.py": [(3, 5), (40, 52)], "model/rope.py": [(7, 7)], "gone.py": []},
    )
    assert conflict.describe() == (
        "both change train.py lines 3-5, 40-52; model/rope.py line 7; gone.py"
    )
    assert gitrepo._overlap([(10, 20)], [(21, 25)]) == [(10, 25)]  # adjacent lines conflict
    assert gitrepo._overlap([(10, 20), (30, 30)], [(15, 30)]) == [(15, 20), (30, 30)]
    assert gitrepo._overlap([(10, 20)], [(30, 40)]) == []


def test_a_branch_whose_lines_base_rewrote_cannot_be_applied(repo: Path, tmp_path: Path) -> None:
    old = git(repo, "rev-parse", "HEAD")
    write(repo, edit(LINES, 20, 25, "rewritten on main"))
    commit(repo, "main rewrites 20-25")
    branch(repo, "stale", edit(LINES, 22, 23, "stale"), start=old)
    branch(repo, "fine", edit(LINES, 55, 55, "fine"), start=old)
    r = open_repo(repo, tmp_path)
    base = r.resolve("main")
    stale = r.change(base, "stale", source="contribs/stale.yaml: git")
    assert stale.merge_base == old
    with pytest.raises(MergeConflict) as caught:
        r.can_apply(base, stale)
    assert str(caught.value) == (
        "contribs/stale.yaml: git: 'stale' cannot be applied to base main in repository "
        "../trainer: both change train.py lines 22-23"
    )
    fine = r.change(base, "fine")
    r.can_apply(base, fine)  # an old branch that merges cleanly is fine
    text = r.read(r.merge(base, [fine]), "train.py") or ""
    assert "line 20 = rewritten on main" in text and "line 55 = fine" in text
    with pytest.raises(MergeConflict, match="cannot be applied to base main"):
        r.conflict(base, fine, stale)


def test_changes_from_different_merge_bases_say_whose_lines(repo: Path, tmp_path: Path) -> None:
    old = git(repo, "rev-parse", "HEAD")
    write(repo, ["header", *LINES])  # main inserts a line at the top: the numbering shifts
    commit(repo, "header")
    branch(repo, "old", edit(LINES, 30, 31, "old"), start=old)
    branch(repo, "new", ["header", *edit(LINES, 30, 31, "new")])
    r = open_repo(repo, tmp_path)
    base = r.resolve("main")
    found = r.conflict(base, r.change(base, "old"), r.change(base, "new"))
    assert found is not None and found.ranges_from == "old"
    assert found.describe() == (
        "both change train.py lines 30-31 (line numbers as old changes them: "
        "the two start from different commits)"
    )


def test_read_gives_text_or_none(repo: Path, tmp_path: Path) -> None:
    write(repo, ["x = 1"], "conf/train.toml")
    commit(repo, "conf")
    r = open_repo(repo, tmp_path)
    tree = r.tree(r.resolve("main"))
    assert r.read(tree, "conf/train.toml") == "x = 1\n"
    assert r.read(tree, "./conf/train.toml") == "x = 1\n"
    assert r.read(tree, "conf/missing.toml") is None
    assert r.read(tree, "conf/train") is None
    with pytest.raises(GitError, match="conf is not a file"):
        r.read(tree, "conf")


def test_export_writes_the_tree_once_and_reuses_it(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    branch(repo, "a", edit(LINES, 5, 5, "a"))
    r = open_repo(repo, tmp_path)
    base = r.resolve("main")
    tree = r.merge(base, [r.change(base, "a")])
    root = tmp_path / "out" / "trees"
    dest = r.export(tree, root)
    assert dest == root / tree
    assert "line 5 = a" in (dest / "train.py").read_text()
    assert (dest / "README").read_text() == "trainer\n"
    assert sorted(p.name for p in root.iterdir()) == [tree]  # no temporary folder left
    (dest / "marker").write_text("kept")
    stamp = (dest / "train.py").stat().st_mtime_ns
    assert r.export(tree, root) == dest
    assert (dest / "marker").read_text() == "kept"
    assert (dest / "train.py").stat().st_mtime_ns == stamp

    # Another process finishes the same tree first: its copy is kept, ours discarded.
    base_tree = r.tree(base)
    real_mkdtemp = gitrepo.tempfile.mkdtemp

    def racing_mkdtemp(**kwargs: object) -> str:
        theirs = root / base_tree
        theirs.mkdir()
        (theirs / "theirs").write_text("first")
        return real_mkdtemp(**kwargs)

    monkeypatch.setattr(gitrepo.tempfile, "mkdtemp", racing_mkdtemp)
    assert r.export(base_tree, root) == root / base_tree
    assert (root / base_tree / "theirs").read_text() == "first"
    assert sorted(p.name for p in root.iterdir()) == sorted([tree, base_tree])
    monkeypatch.undo()

    # Two exporters at once both end with the one complete copy.
    fresh = tmp_path / "fresh"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(r.export(tree, fresh))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [fresh / tree] * 2
    assert sorted(p.name for p in fresh.iterdir()) == [tree]
    assert (fresh / tree / "train.py").read_text() == (dest / "train.py").read_text()


def test_the_repository_gets_no_new_object(repo: Path, tmp_path: Path) -> None:
    branch(repo, "a", edit(LINES, 5, 6, "a"))
    branch(repo, "b", edit(LINES, 40, 41, "b"))
    branch(repo, "c", edit(LINES, 40, 41, "c"))
    git(repo, "gc", "-q")  # packed, so loose objects written by mistake would stand out
    before = object_files(repo)
    r = open_repo(repo, tmp_path)
    base = r.resolve("main")
    a, b, c = (r.change(base, x) for x in "abc")
    tree = r.merge(base, [a, b])
    assert r.conflict(base, b, c) is not None
    r.export(tree, tmp_path / "trees")
    r.uncommitted_at(base)
    assert object_files(repo) == before
    assert any(p.is_file() for p in (tmp_path / "out" / "objects").rglob("*"))
    # the merge's objects are only in the round's folder
    with pytest.raises(subprocess.CalledProcessError):
        git(repo, "cat-file", "-e", tree)
