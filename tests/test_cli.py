import json

import click
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from pipeline import db as D
from pipeline.cli import cli
from tests.conftest import DICOM, NIH_CSV


def all_commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, prefix + (name,))


COMMANDS = list(all_commands(cli))


@pytest.mark.parametrize("path, cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_has_help(path, cmd):
    assert cmd.help and len(cmd.help.strip()) > 20
    if not isinstance(cmd, click.Group):
        assert "Example:" in cmd.help, f"{' '.join(path)} needs an Example: block"
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0


def run(url, *args):
    return CliRunner().invoke(cli, ["--db", url, *args], catch_exceptions=False)


def test_catalogue_groups_and_query(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    r = run(url, "catalogue", "load", "dicom", str(DICOM), "--workers", "1")
    assert r.exit_code == 0 and "6 rows loaded" in r.output
    r = run(url, "query", "SELECT uid, view FROM catalogue ORDER BY uid LIMIT 2", "--json")
    rows = json.loads(r.output)
    assert rows[0] == {"uid": "RG1_J2KI", "view": "PA"}
    r = run(url, "query", "SELECT COUNT(*) AS n FROM images", "--csv")
    assert r.output.splitlines() == ["n", "6"]
    r = run(url, "groups", "assign")
    assert "(no group)  6  (group_name NULL in the views)" in r.output


def test_query_is_read_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    run(url, "catalogue", "load", "dicom", str(DICOM), "--workers", "1")
    for sql in ("DELETE FROM images", "DROP TABLE images", "UPDATE images SET text='x'"):
        r = CliRunner().invoke(cli, ["--db", url, "query", sql])
        assert r.exit_code == 1 and "read-only" in r.output
    r = run(url, "query", "SELECT COUNT(*) AS n FROM images", "--json")
    assert json.loads(r.output) == [{"n": 6}]
    r = CliRunner().invoke(cli, ["--db", url, "query", "SELECT nope FROM images"])
    assert r.exit_code == 1 and "SQL error" in r.output


def test_bad_input_gets_a_clear_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    r = CliRunner().invoke(cli, ["--db", url, "catalogue", "load", "nih", str(DICOM / "RG1_UNCR.dcm")])
    assert r.exit_code == 1 and "Error:" in r.output
    r = CliRunner().invoke(cli, ["--db", url, "catalogue", "load", "csv", str(NIH_CSV)])
    assert r.exit_code == 1 and "--map uid=COLUMN is required" in r.output
    r = CliRunner().invoke(cli, ["--db", url, "label", "--group", "cardiomegaly"])
    assert r.exit_code == 1 and "groups list" in r.output
    r = CliRunner().invoke(cli, ["--db", url, "train", "--model", "cxr_dep"])
    assert r.exit_code == 1 and "did you mean 'cxr_deep'" in r.output and "\n" not in r.output.strip()
    r = CliRunner().invoke(cli, ["--db", url, "evaluate"])
    assert r.exit_code == 1 and "masks import" in r.output


def test_groups_list_json(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run(url, "db", "init").exit_code == 0
    r = run(url, "groups", "list", "--json")
    assert json.loads(r.output) == []


def test_a_command_that_reads_refuses_a_database_that_does_not_exist(tmp_path, monkeypatch):
    """The default data/catalogue.db is relative to the current folder: `status` elsewhere made
    an empty database and said "catalogue 0 images", and a mistyped --db made a file and then
    said "no group named 'healthy'". Only a load, an import or `db init` makes one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for args in (["status"], ["groups", "list"], ["label", "--group", "healthy"], ["models", "list"]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code != 0 and f"no database at {tmp_path / 'data' / 'catalogue.db'}" in r.output, (args, r.output)
        assert not (tmp_path / "data" / "catalogue.db").exists()
    typo = f"sqlite:///{tmp_path / 'catalgue.db'}"
    r = CliRunner().invoke(cli, ["--db", typo, "report", "--group", "healthy"])
    assert r.exit_code != 0 and "catalgue.db" in r.output and not (tmp_path / "catalgue.db").exists()
    assert CliRunner().invoke(cli, ["db", "init"]).exit_code == 0
    assert CliRunner().invoke(cli, ["status"]).exit_code == 0


def test_a_run_explains_its_failures_and_failures_lists_them(tmp_path, monkeypatch):
    """NIH rows whose images are not on this machine: the run groups its failures by reason,
    says what to fix, and `failures` lists them newest first."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    from tests.test_catalogue import nih_slice
    assert run(url, "catalogue", "load", "nih", str(nih_slice(tmp_path, 8))).exit_code == 0  # no images here
    r = run(url, "collect", "--all", "--size", "64", "--workers", "1", "--cache", str(tmp_path / "cache"))
    assert r.exit_code == 4 and "8 failed" in r.output  # items failed, none done: a script can tell
    assert "most of the selection (8 of 8) has no file on disk" in r.output and "--image-root" in r.output
    assert "8 x DecodeError: file not found   e.g. " in r.output
    assert "see them all: cxrlabel failures --stage collect" in r.output
    listed = json.loads(run(url, "failures", "--stage", "collect", "--json").output)
    assert len(listed) == 8 and all(f["message"].endswith("file not found") for f in listed)
    table = run(url, "failures", "--limit", "3").output
    assert len(table.strip().splitlines()) == 2 + 3  # header, rule, three problems
    assert all(line.rstrip().endswith("file not found") for line in table.strip().splitlines()[2:])  # uncut
    monkeypatch.setattr("pipeline.cli.results.FAILURES_SHOWN", 5)  # the table's default, met
    table = run(url, "failures").output.strip().splitlines()
    assert len(table) == 2 + 5 + 1 and table[-1].startswith("... 3 more not shown: `cxrlabel failures --limit N`")
    assert "no label run 99" in run(url, "failures", "--since", "99").output
    r = run(url, "label", "--all", "--device", "cpu", "--workers", "1", "--cache", str(tmp_path / "cache"))
    assert "0 labelled" in r.output and "8 failed" in r.output and "no file on disk" in r.output
    assert "see them all: cxrlabel failures --stage label --since 1" in r.output and r.exit_code == 4
    assert run(url, "catalogue", "load", "dicom", str(DICOM), "--workers", "1").exit_code == 0
    r = run(url, "label", "--all", "--device", "cpu", "--workers", "1", "--cache", str(tmp_path / "cache"))
    assert r.exit_code == 3 and "8 failed" in r.output  # some failed, the rest labelled
    r = run(url, "label", "--source", "dicom", "--device", "cpu", "--workers", "1", "--cache", str(tmp_path / "cache"))
    assert r.exit_code == 0 and "0 failed" in r.output  # all done before: nothing failed


def test_paths_are_stored_absolute_and_reroot_moves_an_archive(tmp_path, monkeypatch):
    import shutil
    archive = tmp_path / "old" / "dicom"
    shutil.copytree(DICOM, archive)
    (tmp_path / "list.csv").write_text("id,file\n" + "".join(f"{p.stem},dicom/{p.name}\n"
                                                              for p in sorted(archive.glob("*.dcm"))))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    monkeypatch.chdir(tmp_path / "old")  # relative paths resolve against the CSV's folder, not here
    shutil.move(tmp_path / "list.csv", tmp_path / "old" / "list.csv")
    assert run(url, "catalogue", "load", "csv", "list.csv", "--map", "uid=id", "--map", "path=file").exit_code == 0
    paths = [r["path"] for r in json.loads(run(url, "query", "SELECT path FROM images", "--json").output)]
    assert len(paths) == 6 and all(p.startswith(str(archive)) for p in paths)
    shutil.move(tmp_path / "old", tmp_path / "new")  # the archive moves
    monkeypatch.chdir(tmp_path)
    r = run(url, "catalogue", "reroot", str(tmp_path / "old"), str(tmp_path / "new"))
    assert "6 image paths moved" in r.output and "6 of them lead to a file" in r.output
    assert "0 image paths moved" in run(url, "catalogue", "reroot", str(tmp_path / "ne"), "x").output  # whole folders
    r = run(url, "label", "--all", "--device", "cpu", "--workers", "1", "--cache", str(tmp_path / "cache"))
    assert "6 labelled" in r.output


def test_status_says_what_the_database_holds_and_what_to_do_next(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run(url, "db", "init").exit_code == 0
    empty = json.loads(run(url, "status", "--json").output)
    assert empty["images"] == {} and empty["runs"] == [] and empty["next"].startswith("cxrlabel catalogue load")
    run(url, "catalogue", "load", "dicom", str(DICOM), "--workers", "1")
    assert "cxrlabel groups assign" in run(url, "status").output
    run(url, "label", "--all", "--limit", "2", "--device", "cpu", "--workers", "1", "--cache", str(tmp_path / "c"))
    full = json.loads(run(url, "status", "--json").output)
    assert full["images"] == {"dicom": 6} and full["labelled"] == {"default": 2}
    assert full["cache"] == {"256 px pad": 2} and full["masks"] == {"predicted": 6}
    assert full["runs"][0]["n_labelled"] == 2 and full["runs"][0]["status"] == "done"
    text = run(url, "status").output
    assert "catalogue  6 images by source (dicom 6)" in text and "run 1: default on cpu, done, 2 labelled" in text


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path):
    """`cxrlabel query ... --csv | head -2`: no 'unexpected BrokenPipeError', the SIGPIPE status."""
    import subprocess
    import sys
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run(url, "db", "init").exit_code == 0  # the database exists
    many = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) SELECT x FROM c"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--db", url, "query", many, "--csv"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"x" and proc.stdout.readline().strip() == b"1"  # csv ends rows in CRLF
    proc.stdout.close()  # as `head -2` does
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""


def test_a_mistyped_ready_query_names_the_one_meant(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run(url, "db", "init").exit_code == 0
    r = run(url, "query", "ctr_by_grop")
    assert r.exit_code == 1 and "no ready query named 'ctr_by_grop': did you mean ctr_by_group?" in r.output
    assert run(url, "query", "SELECT 1 AS one").exit_code == 0


def test_a_name_that_does_not_exist_is_said_so_with_the_names_that_do(tmp_path):
    from pipeline import db as D
    url = f"sqlite:///{tmp_path / 'c.db'}"
    engine = D.connect(url)
    with engine.begin() as c:
        c.execute(D.images.insert(), [{"uid": f"u{i}", "source": "csv", "loaded_at": D.utcnow()} for i in range(3)])
        c.execute(D.groups.insert(), [{"uid": "u0", "group_name": "cardiomegaly", "rule": "t",
                                       "assigned_at": D.utcnow()}])
        c.execute(D.measurements.insert(), [{"uid": "u0", "model": "default", "labelled_at": D.utcnow()}])
    engine.dispose()
    for args, words in ((["report", "--group", "Cardiomegaly", "--out", str(tmp_path / "r")],
                         "no group named 'Cardiomegaly': there are cardiomegaly"),
                        (["report", "--sample", "nosuch", "--out", str(tmp_path / "r")], "no sample named 'nosuch'"),
                        (["export", "rle", "--group", "nosuch", "--out", str(tmp_path / "x.csv")],
                         "no group named 'nosuch'"),
                        (["evaluate", "--model", "nosuch"], "no model with labels named 'nosuch': there are default"),
                        (["label", "--group", "healthy"], "no group named 'healthy'")):
        r = run(url, *args)
        assert r.exit_code == 1 and words in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1
    r = run(url, "export", "rle", "--out", str(tmp_path / "y.csv"))  # as label: never everything by omission
    assert r.exit_code == 2 and "choose what to export: --group G, --sample NAME, --source S or --all" in r.output
    assert not (tmp_path / "y.csv").exists()


def test_collect_caches_what_the_model_reads_so_labelling_finds_it_done(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run(url, "catalogue", "load", "dicom", str(DICOM), "--workers", "1").exit_code == 0
    r = run(url, "collect", "--all", "--workers", "1", "--cache", str(tmp_path / "cache"))
    assert r.exit_code == 0 and "collect (256 px, pad): 6 selected, 6 cached now" in r.output
    assert run(url, "label", "--all", "--device", "cpu", "--workers", "1", "--cache", str(tmp_path / "cache")
               ).exit_code == 0
    one = run(url, "query", "SELECT COUNT(DISTINCT settings_id) AS n, COUNT(*) AS entries FROM cache", "--json")
    assert json.loads(one.output) == [{"n": 1, "entries": 6}]  # labelling added no second cache
    r = run(url, "catalogue", "reroot", "dicom", str(tmp_path))
    assert "0 image paths moved" in r.output and "give OLD_PREFIX as an absolute path" in r.output


def test_selection_options_are_one_set_and_a_pilot_can_be_drawn_from_films_on_disk(tmp_path):
    """A 40-film pilot drew rows without files and `label --sample pilot` failed on all 40:
    `groups sample --on-disk` (and --source) draws only films here; every command that selects
    takes the same options, `export` --source among them."""
    from tests.test_catalogue import nih_slice
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run(url, "catalogue", "load", "nih", str(nih_slice(tmp_path, 8))).exit_code == 0  # files elsewhere
    assert run(url, "catalogue", "load", "dicom", str(DICOM), "--workers", "1").exit_code == 0
    eng = D.connect(url)
    with eng.begin() as c:
        uids = c.execute(text("SELECT uid FROM images")).scalars().all()
        c.execute(D.groups.insert(), [{"uid": u, "group_name": "healthy", "rule": "t", "assigned_at": D.utcnow()}
                                      for u in uids])
    eng.dispose()
    r = run(url, "groups", "sample", "--name", "pilot", "--per-group", "40", "--on-disk")
    assert r.exit_code == 0 and "pilot/healthy: 6" in r.output, r.output
    r = run(url, "catalogue", "list", "--sample", "pilot", "--json")
    assert {x["source"] for x in json.loads(r.output)} == {"dicom"}
    r = run(url, "catalogue", "list", "--all", "--on-disk", "--limit", "3", "--json")
    assert len(json.loads(r.output)) == 3 and {x["source"] for x in json.loads(r.output)} == {"dicom"}
    r = run(url, "collect", "--source", "nih", "--on-disk", "--cache", str(tmp_path / "cache"))
    assert r.exit_code != 0 and "none of the 8 images of this selection has its file on this machine" in r.output
    r = run(url, "label", "--sample", "pilot", "--limit", "2", "--device", "cpu", "--workers", "1",
            "--cache", str(tmp_path / "cache"))
    assert r.exit_code == 0 and "2 labelled" in r.output, r.output
    r = run(url, "export", "rle", "--source", "dicom", "--out", str(tmp_path / "x.csv"))
    assert r.exit_code == 0 and "2 written" in r.output, r.output
    r = run(url, "groups", "sample", "--name", "p2", "--per-group", "3", "--group", "cardiomegaly")
    assert r.exit_code != 0 and "no group named 'cardiomegaly': there are healthy" in r.output


def test_messages_point_the_right_way(tmp_path):
    """`label --all` on an empty catalogue pointed to `groups list`; `label` with no selection
    exited 1 where usage errors are 2; `review --group foo` said to run label first; `report
    --out` into a folder that does not exist made the whole tree."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert run(url, "db", "init").exit_code == 0
    r = CliRunner().invoke(cli, ["--db", url, "label", "--all"])
    assert r.exit_code == 1 and "catalogue load" in r.output and "groups list" not in r.output
    assert run(url, "catalogue", "load", "dicom", str(DICOM), "--workers", "1").exit_code == 0
    r = CliRunner().invoke(cli, ["--db", url, "label"])
    assert r.exit_code == 2 and "choose exactly one of --group, --sample or --all" in r.output
    r = CliRunner().invoke(cli, ["--db", url, "review", "--group", "foo"])
    assert r.exit_code == 1 and "no group named 'foo'" in r.output
    r = CliRunner().invoke(cli, ["--db", url, "report", "--group", "foo",
                                 "--out", str(tmp_path / "no" / "such" / "x")])
    assert r.exit_code == 2 and "does not exist" in r.output and not (tmp_path / "no").exists()
