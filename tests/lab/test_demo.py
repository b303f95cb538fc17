import torch

from normlab.lab import cli
from normlab.lab.demo import DemoConfig, TinyCNN, make_images, run_demo


def test_images_are_reproducible_and_labelled():
    x1, y1 = make_images(50, seed=3)
    x2, y2 = make_images(50, seed=3)
    assert x1.shape == (50, 1, 16, 16) and y1.shape == (50,)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(make_images(50, seed=4)[0], x1)
    assert set(y1.tolist()) <= set(range(10))


def test_tiny_cnn_takes_any_factory_spec():
    for spec in ["bn", "gn:8", "ln", "frn", "none"]:
        assert TinyCNN(spec)(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_demo_smoke_prints_table_and_learns():
    lines = []
    cfg = DemoConfig(train_size=1000, test_size=300, epochs=3, batch_sizes=(32, 8))
    results = run_demo(cfg, echo=lines.append)
    assert set(results) == {(n, b) for n in cfg.norms for b in cfg.batch_sizes}
    assert any(line.strip().startswith("norm") and "batch 32" in line for line in lines)
    # better than the 90% error of guessing among 10 classes
    assert results["bn", 32] < 50 and results["gn:8", 32] < 50 and results["gn:8", 8] < 50


def test_cli_parses_demo_options():
    args = cli.build_parser().parse_args(["demo", "--epochs", "1", "--seed", "2"])
    assert args.command == "demo" and args.epochs == 1 and args.seed == 2
