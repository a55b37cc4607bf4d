"""fastig.core.progress: one display for nested tasks, model passes counted by the engine, silence without one."""

import io

import torch

from fastig.attr import IntegratedGradients, Occlusion
from fastig.core import progress

from _shared import SmallCNN


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_nested_tasks_share_the_outer_line_and_passes_are_counted():
    stream = io.StringIO()
    with progress.task("run", 2, "images", show=True, stream=stream, interval=0.0) as images:
        with progress.task("Guided IG", 3, "steps") as steps:
            steps.advance()
            progress.pulse()
            progress.pulse()
        images.advance(2)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("run: 0/2 images (0%)") and "Guided IG 1/3 steps" in lines[0]
    assert lines[1].endswith("| 1 model pass") and lines[2].endswith("| 2 model passes")  # on the innermost task
    assert lines[-1].startswith("run: 2/2 images (100%)")


def test_nothing_is_printed_without_a_display(capsys):
    with progress.task("silent", 4) as t:
        t.advance(4)
        progress.pulse()
    assert t.count == 4 and t.passes == 1
    assert capsys.readouterr().err == ""


def test_a_terminal_line_is_redrawn_in_place_and_ends_with_a_newline():
    tty = Terminal()
    with progress.task("ig", 4, "images", show=True, stream=tty) as images:
        images.advance(4)
    text = tty.getvalue()
    assert text.startswith("\rig [") and "4/4 images" in text and text.endswith("\n") and text.count("\n") == 1


def test_the_engine_reports_every_model_pass():
    model = SmallCNN().eval()
    x = torch.rand(2, 3, 8, 8)
    with progress.task("outer", 1) as t:
        IntegratedGradients(model).attribute(x, target=0, n_steps=6, internal_batch_size=4)
    assert t.passes == 3  # 12 points, 4 per pass


def test_show_progress_on_a_perturbation_class_names_the_method_and_the_work(capsys):
    model = SmallCNN().eval()
    Occlusion(model).attribute(torch.rand(1, 3, 8, 8), sliding_window_shapes=(3, 4, 4), strides=4, target=0,
                               perturbations_per_eval=2, show_progress=True)
    err = capsys.readouterr().err
    assert "Occlusion" in err and "4/4 windows (100%)" in err
