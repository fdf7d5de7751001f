"""The runtime's start-up chatter never reaches stderr; our own lines and real problems do."""

import os
import subprocess
import sys

from captioner import runtime

# Lines TensorFlow printed on this kind of machine (no GPU) when imported, before this fix.
CHATTER = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796128268.453023    4787 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.",
    "I0000 00:00:1796128268.516226    4787 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available "
    "CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate "
    "compiler flags.",
    "E0000 00:00:1796128314.692869    6205 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
]


def test_chatter_lines_are_recognised_and_ours_are_not():
    assert all(runtime.is_chatter(line) for line in CHATTER)
    assert not runtime.is_chatter("error: model directory not found: models/x")
    assert not runtime.is_chatter("ImportError: libcudnn.so.9: cannot open shared object file")


def test_quiet_stderr_drops_chatter_written_to_the_descriptor_and_keeps_the_rest(capfd):
    with runtime.quiet_stderr():
        os.write(2, ("\n".join(CHATTER) + "\nsomething real went wrong\n").encode())
    err = capfd.readouterr().err
    assert err == "something real went wrong\n"


def test_a_command_that_loads_keras_prints_only_our_line(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from captioner.cli import caption_main; sys.exit(caption_main())",
         "--model", str(model_dir), str(tmp_path / "photo.jpg")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: model directory"), done.stderr
