"""Run by doctor inside the team image (python3 -c): what torch there can do for FP8 on the
GPUs of this host, and whether xformers loads. Prints one JSON line."""

import json

report = {}
try:
    import torch
    report["torch"] = torch.__version__
    report["float8"] = hasattr(torch, "float8_e4m3fn")
    report["cuda"] = torch.cuda.is_available()
    if report["float8"] and report["cuda"]:
        try:
            a = torch.randn(32, 32, device="cuda").to(torch.float8_e4m3fn)
            b = torch.randn(32, 32, device="cuda").to(torch.float8_e4m3fn).t()
            one = torch.tensor(1.0, device="cuda")
            torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            report["scaled_mm"] = "ok"
        except Exception as exc:
            report["scaled_mm"] = str(exc).splitlines()[0][:200]
except Exception as exc:
    report["torch_error"] = str(exc)[:200]
try:
    import xformers.ops
    report["xformers"] = getattr(xformers, "__version__", "?")
except ModuleNotFoundError:
    report["xformers"] = None
except Exception as exc:
    report["xformers_error"] = str(exc).splitlines()[0][:200]
print(json.dumps(report))
