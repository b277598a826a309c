"""The ``elm`` command line."""

import sys

import click

from elmcore.errors import ELMError

DEFAULT_GRADCHECK_CONFIG = {
    "num_input": 7, "num_output": 3, "num_memory": 4, "mlp_num_layers": 2, "mlp_hidden_size": 5,
    "mlp_activation": "silu", "num_branch": 3, "num_synapse_per_branch": 3,
    "input_to_synapse_routing": "neuronio_routing", "learn_memory_tau": True, "memory_tau_max": 50.0,
}


class UserError(click.ClickException):
    """A problem with the user's input: one line on stderr, exit code 2 (as click's usage errors)."""
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


class ELMGroup(click.Group):
    """Turns every ELMError raised by a command into a UserError, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ELMError as e:
            raise UserError(str(e)) from None
        except MemoryError:
            raise UserError("out of memory: reduce the batch size or sequence length") from None


@click.group(cls=ELMGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="elmcore")
def cli():
    """Train, evaluate and check ELM neurons and Branch-ELMs (Spieler et al., ICLR 2024)."""


device_option = click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu",
                             show_default=True, help="Where to compute.")


# ---- verify -----------------------------------------------------------------------

@cli.command()
@click.argument("oracle", type=click.Path(dir_okay=False))
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True)
@device_option
def verify(oracle, dtype, device):
    """Check the engine against an oracle file from the official release.

    Prints every array's error max|got − ref| / max|ref| and exits 0 only if all
    are within tolerance (float64: 1e-9, float32: 1e-3).
    """
    from elmcore.oracle import TOLERANCE, load_oracle, verify_case
    case = load_oracle(oracle)
    tol = TOLERANCE[dtype]
    results = verify_case(case, dtype=dtype, device=device)
    width = max(len(n) for n, _ in results)
    for name, err in results:
        click.echo(f"  {name:<{width}}  {err:9.2e}  {'ok' if err <= tol else 'FAIL'}")
    passed = sum(err <= tol for _, err in results)
    worst_name, worst = max(results, key=lambda r: r[1])
    click.echo(f"verify: {passed}/{len(results)} arrays within tolerance "
               f"(worst {worst:.1e}: {worst_name})")
    sys.exit(0 if passed == len(results) else 1)


# ---- info -------------------------------------------------------------------------

@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
def info(path):
    """Summarise a model config (JSON) or a checkpoint / converted model (.npz)."""
    from elmcore.inspect import describe_path
    for line in describe_path(path):
        click.echo(line)


# ---- gradcheck ----------------------------------------------------------------------

@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Model config JSON (default: a small 2-layer SiLU Branch-ELM with neuronio routing).")
@click.option("--version", "version", type=click.Choice(["elm_v1", "branch_elm_v2"]), default=None,
              help="Override the config's version.")
@click.option("--batch", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=6, show_default=True, type=click.IntRange(min=1))
@click.option("--eps", default=1e-6, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--entries", default=12, show_default=True, type=click.IntRange(min=1),
              help="Entries checked per tensor (all when the tensor is smaller).")
@click.option("--seed", default=0, show_default=True)
@click.option("--tolerance", default=1e-6, show_default=True, type=float)
def gradcheck(config_path, version, batch, steps, eps, entries, seed, tolerance):
    """Compare analytic gradients with central differences in float64, tensor by tensor."""
    from elmcore.config import ELMConfig
    from elmcore.gradcheck import gradcheck as run_gradcheck, passes
    cfg = ELMConfig.load(config_path) if config_path else ELMConfig.from_dict(DEFAULT_GRADCHECK_CONFIG)
    if version:
        cfg = ELMConfig.from_dict(_switch_version(cfg, version))
    rows = run_gradcheck(cfg, batch=batch, steps=steps, seed=seed, eps=eps, max_entries=entries)
    click.echo(f"gradcheck {cfg.version}, B={batch}, T={steps}, eps={eps:g}, float64 "
               f"(difference-quotient noise {rows[0][6]:.1e}: smaller errors pass)")
    width = max(len(r[0]) for r in rows)
    click.echo(f"  {'tensor':<{width}}  {'shape':<14} {'n':>3}  {'max|a-n|':>9}  {'max|n|':>9}  {'rel':>9}")
    bad = 0
    for row in rows:
        name, shape, n, diff, scale, rel, _ = row
        ok = passes(row, tolerance)
        bad += not ok
        click.echo(f"  {name:<{width}}  {str(shape):<14} {n:>3}  {diff:9.2e}  {scale:9.2e}  {rel:9.2e}"
                   f"  {'ok' if ok else 'FAIL'}")
    worst = max(rows, key=lambda r: r[5])
    click.echo(f"gradcheck: {len(rows) - bad}/{len(rows)} tensors within {tolerance:g} "
               f"(worst {worst[5]:.1e}: {worst[0]})")
    sys.exit(0 if bad == 0 else 1)


def _switch_version(cfg, version):
    d = cfg.to_dict()
    tau = d.pop("tau_s_value", None) or d.pop("tau_b_value", None)
    d["version"] = version
    d["tau_b_value" if version == "branch_elm_v2" else "tau_s_value"] = tau
    return d


def _register_optional_commands():
    """Command groups that live in their own modules."""
    try:
        from elm_cli.data_cmd import data
    except ImportError:  # pragma: no cover - the data group ships with the package
        return
    cli.add_command(data)


_register_optional_commands()


def main():
    cli(prog_name="elm")


if __name__ == "__main__":
    main()
