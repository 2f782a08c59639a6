from pipeline.errors import first_line


def test_first_line_keeps_the_head_and_never_comes_back_empty():
    assert first_line(RuntimeError("run not found\n  Traceback ...")) == "run not found"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(KeyError()) == "KeyError"


def test_a_password_is_masked_whatever_characters_it_holds():
    """Every printable character in a password (an "@" percent-encoded, as a URL needs it), where SQLAlchemy's
    own parser finds the password: none of it survives `redact`. "SEC/RET" was shown in full when the mask
    stopped at the first "/"."""
    import string
    from urllib.parse import unquote

    from sqlalchemy.engine import make_url

    from pipeline.errors import MASK, redact

    for char in [*string.printable.replace("@", "").replace("\n", "").replace("\r", ""), "%40"]:
        secret = f"SEC{char}RET"
        url = f"postgresql://user:{secret}@db.example.org:5432/optuna"
        assert make_url(url).password == unquote(secret), char  # the driver reads all of it as the password
        masked = redact(f"cannot open tune.storage {url}: connection refused")
        assert "SEC" not in masked and "RET" not in masked, (char, masked)
        assert f"postgresql://user:{MASK}@db.example.org:5432/optuna" in masked, (char, masked)
    assert make_url("postgresql://user:SEC/RET@host/db").password == "SEC/RET"
    assert redact("postgresql://user:SEC/RET@host/db") == "postgresql://user:***@host/db"
