"""The command line as vLLM users type it: vLLM's serve flags, list options followed by a positional,
errors with the subcommand's usage."""
import pytest

from hark.cli import parse_args

WAV = "tests/data/sense_and_sensibility_01_austen_64kb-0870.wav"


def test_vllm_serve_flags_are_accepted():
    args = parse_args(["serve", "Qwen/Qwen2-Audio-7B-Instruct", "--trust-remote-code", "--enforce-eager",
                       "--generation-config", "auto", "--uvicorn-log-level", "warning", "--served-model-name", "a",
                       "b", "--gpu-memory-utilization", "0.9", "--max-model-len", "4096", "--disable-log-requests"])
    assert args.served_model_name == ["a", "b"] and args.trust_remote_code and args.enforce_eager
    assert args.uvicorn_log_level == "warning" and args.max_model_len == 4096


def test_model_after_a_list_option_is_not_swallowed():
    args = parse_args(["serve", "--allowed-media-domains", "example.com", "*.cdn.org", "Qwen/Qwen2-Audio-7B"])
    assert args.model == "Qwen/Qwen2-Audio-7B" and args.allowed_media_domains == ["example.com", "*.cdn.org"]
    args = parse_args(["chat", "MODEL", "--audio", WAV, "What is the speaker saying?"])
    assert args.message == "What is the speaker saying?" and args.audio == [WAV]
    args = parse_args(["chat", "MODEL", "--audio", WAV, "missing.wav"])     # a missing file stays a file
    assert args.message is None and args.audio == [WAV, "missing.wav"]


def test_errors_show_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit):
        parse_args(["serve", "MODEL", "--no-such-flag"])
    err = capsys.readouterr().err
    assert "usage: hark serve" in err and "unrecognized arguments: --no-such-flag" in err
    with pytest.raises(SystemExit):
        parse_args(["serve", "MODEL", "--allowed-media-domains", "example.com", "bad/host"])
    assert "host names" in capsys.readouterr().err
