"""The page plain `dvc plots show` renders offline with: written once per version, named in .dvc/config.local."""

from helpers import git, run_dvc
from pipeline import commands, paths


def test_the_offline_page_is_named_for_dvc_written_once_per_version_and_a_users_template_is_kept(tmp_path,
                                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    git(tmp_path, "init", "-q")
    assert run_dvc("init", "-q", cwd=tmp_path).returncode == 0
    page = commands.offline_plots_template()
    assert page == paths.PLOTS_TEMPLATE and "{plot_divs}" in page.read_text() and "vegaEmbed" in page.read_text()
    assert "html_template = offline-plots.html" in (tmp_path / ".dvc/config.local").read_text()
    written = page.stat().st_mtime_ns
    commands.offline_plots_template()
    assert page.stat().st_mtime_ns == written  # the same versions: not written again

    lines = page.read_text().splitlines()
    page.write_text("\n".join([lines[0], lines[1].replace("vl-convert", "vl-convert 0.1, not"), *lines[2:]]))
    commands.offline_plots_template()
    assert page.read_text().splitlines()[1] == lines[1]  # another version's page: written again

    assert run_dvc("config", "--local", "plots.html_template", "mine.html", cwd=tmp_path).returncode == 0
    commands.offline_plots_template()
    assert "html_template = mine.html" in (tmp_path / ".dvc/config.local").read_text()
