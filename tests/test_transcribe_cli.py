"""`hark transcribe`: options, several files, unreadable files, output names, progress, start-up imports."""
import json
import os
import subprocess
import sys

import pytest
import soundfile as sf
import torch

from hark.cli import build_parser, main
from hark.transcribe.command import ProgressBar, output_names
from test_transcribe_formats import parse_cues

DATA = os.path.join(os.path.dirname(__file__), "data")
CLIP = os.path.join(DATA, "sense_and_sensibility_01_austen_64kb-0930.wav")   # "He might even have been made amiable himself."
OTHER = os.path.join(DATA, "sense_and_sensibility_01_austen_64kb-0880.wav")  # "He was not an ill-disposed young man"
ROOT = os.path.dirname(DATA)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_temperature_is_one_argument_so_a_file_is_never_a_temperature():
    args = build_parser().parse_args(["transcribe", "--temperature", "0", "a.wav"])
    assert args.temperature == (0.0,) and args.files == ["a.wav"]
    args = build_parser().parse_args(["transcribe", "--temperature", "0,0.5,1", "a.wav", "b.wav"])
    assert args.temperature == (0.0, 0.5, 1.0) and args.files == ["a.wav", "b.wav"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["transcribe", "--temperature", "hot", "a.wav"])


def test_faster_whisper_option_names():
    args = build_parser().parse_args(["transcribe", "--vad-filter", "--without-timestamps", "--log-prob-threshold",
                                      "-0.5", "--output-format", "tsv", "--clip-timestamps", "0,5", "x.wav"])
    assert (args.split, args.no_timestamps, args.log_prob_threshold, args.format) == ("speech", True, -0.5, "tsv")


def test_decode_option_flags():
    from hark.transcribe.command import _options
    args = build_parser().parse_args(["transcribe", "--repetition-penalty", "1.2", "--no-repeat-ngram-size", "3",
                                      "--condition-on-previous-text", "--prompt-reset-on-temperature", "0.3", "x.wav"])
    options = _options(args)
    assert (options["repetition_penalty"], options["no_repeat_ngram_size"], options["condition_on_previous_text"],
            options["prompt_reset_on_temperature"]) == (1.2, 3, True, 0.3)
    defaults = _options(build_parser().parse_args(["transcribe", "x.wav"]))
    assert (defaults["repetition_penalty"], defaults["no_repeat_ngram_size"], defaults["condition_on_previous_text"]) == (
        1.0, 0, False)
    with pytest.raises(SystemExit) as exit:       # before any model loads
        main(["transcribe", "--no-repeat-ngram-size", "-1", "x.wav"])
    assert exit.value.code == 2


def test_timestamp_tokens_only_where_the_output_shows_times():
    from hark.transcribe.command import _options

    def timestamps(*argv):
        return _options(build_parser().parse_args(["transcribe", *argv, "x.wav"]))["timestamps"]

    assert not timestamps() and not timestamps("--format", "json")          # text: faster-whisper batched's way
    assert timestamps("--timestamps") and timestamps("--format", "srt") and timestamps("--format", "verbose_json")
    assert timestamps("--format", "all", "--output-dir", "o") and timestamps("--word-timestamps")
    assert not timestamps("--format", "srt", "--no-timestamps")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["transcribe", "--timestamps", "--no-timestamps", "x.wav"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("hark ")


def test_output_names_never_collide():
    names = output_names(["a/x.wav", "b/x.flac", "c/y.wav", "d/y.wav", "-", "z.wav", "z.wav"])
    assert names == ["x.wav", "x.flac", "c_y.wav", "d_y.wav", "stdin", "z.wav", "z.wav-2"]
    assert output_names(["talk.mp3", "interview.m4a"]) == ["talk", "interview"]


def test_progress_shows_tenths_and_never_passes_the_total(capsys):
    bar = ProgressBar(always=True)
    for done in (0.0, 0.1 + 0.2, 5.1, 15.400000000000002, 15.400000000000002 + 1e-9):
        bar(done, 15.4)
        assert bar.bar.n <= bar.bar.total
    bar.close()
    err = capsys.readouterr().err
    assert "15.4/15.4" in err and "0000000" not in err and "<-" not in err


def test_missing_files_are_reported_before_any_model_loads(monkeypatch, capsys, tmp_path):
    import hark.llm

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the missing file was reported")
    monkeypatch.setattr(hark.llm, "LLM", no_model)
    assert main(["transcribe", str(tmp_path / "nope.wav"), str(tmp_path / "typo.flac")]) == 1
    err = capsys.readouterr().err
    assert "nope.wav: no such file" in err and "typo.flac: no such file" in err


def test_startup_imports_neither_transformers_nor_the_server():
    """A whole `hark transcribe` with the built-in tiny.en, in a fresh process."""
    code = ("import sys; from hark.cli import main; rc = main(['transcribe', %r]);"
            "print(sorted(m for m in ('transformers', 'hark.server', 'fastapi', 'uvicorn', 'pydantic', 'xgrammar',"
            "'huggingface_hub', 'jinja2', 'httpx') if m in sys.modules));"
            "import os; print(os.environ.get('OMP_WAIT_POLICY'))" % CLIP)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "amiable" in lines[0] and lines[-2] == "[]" and lines[-1] == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"        # the user's setting stays
    out = subprocess.run([sys.executable, "-c", "import hark, os; print(os.environ['OMP_WAIT_POLICY'])"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "ACTIVE"


def test_program_run_ends_without_teardown_and_keeps_its_output(tmp_path):
    """`python -m hark.cli transcribe` ends through os._exit: stdout (piped, so block-buffered) and the
    exit status still come out whole, and an atexit hook, which only a normal teardown would run, does not."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("import atexit, sys; atexit.register(lambda: print('TEARDOWN', flush=True)); from hark.cli import main;"
            "sys.argv = ['hark', 'transcribe', %r, %r, '--format', 'json']; sys.exit(main())"
            % (CLIP, str(tmp_path / "missing.wav")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1, out.stderr                 # one input missing
    assert "missing.wav: no such file" in out.stderr
    assert "amiable" in json.loads(out.stdout)["text"] and "TEARDOWN" not in out.stdout


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """a/x.wav, b/x.flac (same stem), an unreadable file and a missing one, to --output-dir in every format."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "a").mkdir()
    (root / "b").mkdir()
    samples, sr = sf.read(CLIP, dtype="float32")
    sf.write(root / "a" / "x.wav", samples, sr)
    samples, sr = sf.read(OTHER, dtype="float32")
    sf.write(root / "b" / "x.flac", samples, sr)
    (root / "broken.wav").write_bytes(b"RIFF not really a wave file")
    return root


def test_one_unreadable_file_does_not_stop_the_others(batch, tmp_path, capsys):
    out = tmp_path / "out"
    files = [str(batch / "a" / "x.wav"), str(batch / "broken.wav"), str(batch / "b" / "x.flac"),
             str(batch / "missing.wav")]
    assert main(["transcribe", *files, "--format", "all", "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{batch / 'broken.wav'}: the data is not audio" in err and "missing.wav: no such file" in err
    names = sorted(os.listdir(out))
    assert names == sorted(f"{stem}.{ext}" for stem in ("x.wav", "x.flac") for ext in ("txt", "json", "srt", "vtt", "tsv"))
    assert "amiable" in (out / "x.wav.txt").read_text() and "young man" in (out / "x.flac.txt").read_text()
    tsv = (out / "x.wav.tsv").read_text().splitlines()
    assert tsv[0] == "start\tend\ttext" and all(len(row.split("\t")) == 3 for row in tsv[1:])
    assert json.loads((out / "x.wav.json").read_text())["segments"]
    assert parse_cues((out / "x.flac.srt").read_text(), ",")


@pytest.mark.parametrize("fmt", ["json", "srt"])
def test_several_files_on_stdout_are_told_apart(fmt, capsys, monkeypatch):
    with open(OTHER, "rb") as f:
        monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": f})())
        assert main(["transcribe", CLIP, "-", "--format", fmt]) == 0
    out = capsys.readouterr().out
    if fmt == "json":
        first, second = (json.loads(line) for line in out.strip().splitlines())
        assert first["file"] == CLIP and "amiable" in first["text"]
        assert second["file"] == "stdin" and "young man" in second["text"]
    else:
        first, second = out.split("\n\n==> stdin <==\n")
        assert first.startswith(f"==> {CLIP} <==\n")
        assert "amiable" in parse_cues(first.split("\n", 1)[1], ",")[0][2]
        assert "young man" in " ".join(c[2] for c in parse_cues(second, ","))


def test_word_timed_subtitles_with_line_layout_and_highlighting(capsys):
    assert main(["transcribe", CLIP, "--format", "vtt", "--max-line-width", "16", "--max-line-count", "1"]) == 0
    cues = parse_cues(capsys.readouterr().out[len("WEBVTT\n\n"):], ".")
    assert len(cues) >= 3 and all(len(text) <= 16 or " " not in text for _, _, text in cues)
    assert " ".join(text for _, _, text in cues) == "He might even have been made amiable himself."
    assert all(a[1] <= b[0] for a, b in zip(cues, cues[1:]))
    assert main(["transcribe", CLIP, "--format", "srt", "--highlight-words"]) == 0
    cues = parse_cues(capsys.readouterr().out, ",")
    underlined = [text for _, _, text in cues if "<u>" in text]
    assert len(underlined) == 8 and underlined[0].startswith("<u>He</u> might")


def test_threads_option_and_num_threads(monkeypatch):
    from hark.llm import set_num_threads
    assert build_parser().parse_args(["transcribe", "--threads", "1", "x.wav"]).threads == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["transcribe", "--threads", "0", "x.wav"])
    set_num_threads(1)
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="num_threads"):
        set_num_threads(0)
