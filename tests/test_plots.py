"""The page plain `dvc plots show` renders offline with: written once per version, named in .dvc/config.local."""

import subprocess

from pipeline import commands, paths


def test_the_offline_page_is_named_for_dvc_written_once_per_version_and_a_users_template_is_kept(tmp_path,
                                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["dvc", "init", "-q"], check=True)
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

    subprocess.run(["dvc", "config", "--local", "plots.html_template", "mine.html"], check=True)
    commands.offline_plots_template()
    assert "html_template = mine.html" in (tmp_path / ".dvc/config.local").read_text()
