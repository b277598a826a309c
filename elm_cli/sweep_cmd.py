"""``elm sweep``: train a grid, a list or a parameter-budget family of runs under one directory."""

import os
import shlex
import sys

import click


@click.command()
@click.argument("sweep_file", metavar="SWEEP.toml", type=click.Path(dir_okay=False))
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Points trained at once in local processes (cores are shared equally). "
                   "Under mpiexec the points go to the ranks instead.")
@click.option("--sweep-dir", type=click.Path(file_okay=False),
              help="Where the point run directories go (default: sweep_dir of the file, else sweeps/NAME).")
@click.option("--dry-run", is_flag=True, help="List the points with their parameter counts and exit.")
def sweep(sweep_file, jobs, sweep_dir, dry_run):
    """Train every point of SWEEP.toml as a normal run; write summary.csv and the report.

    \b
    SWEEP.toml holds [base] (the keys of `elm train --config`) and the points:
      [grid]        field = [values, ...]   every combination
      [[points]]    field = value ...       an explicit list
      [budget]      budgets, tolerance, num_neurons, num_memory, num_synapse_per_branch
                    (ELM Network shapes within the tolerance of each parameter budget)
    Fields: training settings (lr, seed, ...), model fields (num_memory or model.num_memory),
    task_options.NAME. A point is the run `elm train --config` makes from the same table.
    Running it again skips finished points and resumes interrupted ones (Ctrl-C stops it
    with exit code 130). The report (report.md, report-*.png; `elm report SWEEP_DIR`
    redraws it) is written at the end.
    """
    from elm_cli.main import _load_run_file
    from elmcore.errors import ELMError
    from elmcore.training.sweep import (check_outputs, check_point_settings, expand_points, point_parameters, run_sweep,
                                        sweep_directory)
    spec = _load_run_file(sweep_file)
    points = expand_points(spec)
    directory = sweep_dir or sweep_directory(spec, sweep_file)
    if dry_run:
        check_point_settings(points)  # the sweep itself would refuse them
        check_outputs(points, directory, inputs=[sweep_file])
        for p in points:
            try:
                count = f"{point_parameters(p):,} parameters"
            except ELMError as e:  # a task whose data is not here: the point is still listed
                count = f"parameters unknown ({e})"
            click.echo(f"{p.name}: {p.overrides}: {count}")
        click.echo(f"{len(points)} points in {directory}")
        return
    try:
        rows = run_sweep(points, directory, jobs=jobs, log=lambda m: click.echo(m, err=True),
                         inputs=[sweep_file])
    except KeyboardInterrupt:
        from elmcore.training.distributed import communicator
        comm = communicator()
        if comm.is_root:
            click.echo(f"sweep interrupted; to go on, run `elm sweep {shlex.quote(sweep_file)}` again: finished "
                       "points are kept, interrupted ones resume from their last checkpoint", err=True)
        if comm.size > 1:  # not through MPI_Finalize, which can wait for ranks still in a collective
            sys.stderr.flush()
            os._exit(130)
        raise SystemExit(130) from None
    if rows is None:  # an MPI rank other than 0
        return
    done = sum(r["status"] == "done" for r in rows)
    click.echo(f"sweep: {done}/{len(rows)} points done; summary {directory}/summary.csv")
    if done < len(rows):
        raise SystemExit(1)
