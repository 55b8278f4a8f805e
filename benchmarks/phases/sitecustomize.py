"""Phase timers for `benchmarks/bench_phases.py` (a measuring tool, not part of the project):
on PYTHONPATH, Python imports this file in every process of a run (the driver, Ray's
workers and actors); when $VGG_PHASES names a file, it wraps the functions of TARGETS as
their modules load and appends one {pid, name, t0, t1} JSON line per call, and one per
timed import ("import:<module>") and process start ("process_boot:<script>")."""
import functools, importlib.abc, importlib.util, json, os, sys, time

OUT = os.environ.get("VGG_PHASES")
T_BOOT = time.time()

TARGETS = {
    "pipeline.runner": ["connect_ray", "disconnect_ray", "tracking.setup_experiment"],
    "pipeline.execution": ["run_stage", "tracking.log_net"],
    "pipeline.ray_train": ["train_loop_per_worker", "_restore", "_loaders", "MlflowLogger.log_params",
                           "ray.train.torch.prepare_model"],
    "stages.train": ["_finish"],
    "vgg.training.loop": ["fit"],
    "pipeline.ray_evaluate": ["_evaluate_share"],
    "vgg.evaluation.shares": ["score_share"],
    "pipeline.sharding": ["_validate"],
    "ray.train.v2.api.data_parallel_trainer": ["DataParallelTrainer.fit"],
    "torch": [], "torch._dynamo": [], "mlflow": [],  # timed imports
}


def _log(name, t0, t1):
    if not OUT:
        return
    line = json.dumps({"pid": os.getpid(), "name": name, "t0": t0, "t1": t1}) + "\n"
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _wrap(fn, name):
    if getattr(fn, "_phase_timed", False):
        return fn

    @functools.wraps(fn)
    def timed(*a, **k):
        t0 = time.time()
        try:
            return fn(*a, **k)
        finally:
            _log(name, t0, time.time())
    timed._phase_timed = True
    return timed


def _patch(mod, attrs):
    for dotted in attrs:
        parts = dotted.split(".")
        obj = mod
        try:
            for p in parts[:-1]:
                obj = getattr(obj, p)
            fn = getattr(obj, parts[-1])
        except AttributeError:
            continue
        if callable(fn):
            setattr(obj, parts[-1], _wrap(fn, f"{mod.__name__.split('.')[-1]}.{dotted}"))


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        orig = loader.exec_module

        def exec_module(module, _orig=orig, _name=name):
            _t0 = time.time()
            _orig(module)
            _log("import:" + _name, _t0, time.time())
            _patch(module, TARGETS[_name])
        loader.exec_module = exec_module
        return spec


if OUT:
    sys.meta_path.insert(0, _Finder())
    _log("process_boot:" + os.path.basename(sys.argv[0] if sys.argv else "?"), T_BOOT, T_BOOT)
