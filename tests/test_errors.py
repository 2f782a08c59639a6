from pipeline.errors import first_line


def test_first_line_keeps_the_head_and_never_comes_back_empty():
    assert first_line(RuntimeError("run not found\n  Traceback ...")) == "run not found"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(KeyError()) == "KeyError"
