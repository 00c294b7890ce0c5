"""PyTorch (CPU) eager, or ``torch.compile`` with ``--compile``.

The same StridedNet in NCHW (PyTorch's default layout; ``--channels-last`` for NHWC memory
format): Conv2d(padding=1) for the stride-2 "same" convolutions (same output sizes as Keras'
asymmetric padding: 45 -> 23 -> 12 -> 6), BatchNorm2d(eps=1e-3, momentum=0.01) = Keras'
(epsilon 1e-3, momentum 0.99), he_normal (kaiming_normal_, fan_in) weights, zero biases,
Adam(1e-4, eps=1e-7), L2 5e-4 on conv kernels added to the loss, cross-entropy on logits.
The uint8 NHWC batch is converted (``from_numpy -> permute -> float / 255``) inside the step.
``torch.set_num_threads(threads)``; the step is synchronous (eager CPU), and a window ends with
``loss.item()``.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()
    common.check_args(args)
    t0 = time.perf_counter()
    import torch
    from torch import nn

    import_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train, x_eval, y_eval = common.make_data(args)

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    t_build = time.perf_counter()
    layers = [nn.Conv2d(3, 16, 7, stride=2)]
    cin = 16
    for w in (32, 64, 128):
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(), bn(w),
                   nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(), bn(w), nn.Dropout(0.25)]
        cin = w
    layers += [nn.Flatten(), nn.Linear(128 * 6 * 6, 512), nn.ReLU(),
               nn.BatchNorm1d(512, eps=1e-3, momentum=0.01), nn.Dropout(0.5),
               nn.Linear(512, common.NUM_CLASSES)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    conv_kernels = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    opt = torch.optim.Adam(model.parameters(), lr=common.LEARNING_RATE, eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()
    net = torch.compile(model) if args.compile else model

    def to_input(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        return x.contiguous(memory_format=fmt)

    def train_step(images, labels):
        x, y = to_input(images), torch.from_numpy(labels).long()
        logits = net(x)
        loss = loss_fn(logits, y) + common.WEIGHT_DECAY * sum((k * k).sum() for k in conv_kernels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    model.train()
    b = args.batch
    done_at: dict[int, float] = {}
    cpu_at: dict[int, float] = {}
    first_step_s = None
    for i in range(args.warmup + args.steps):
        loss = train_step(x_train[i * b:(i + 1) * b], y_train[i * b:(i + 1) * b])
        step = i + 1
        if step == 1 or step % args.window == 0:
            loss.item()
            done_at[step] = time.perf_counter()
            cpu_at[step] = common.cpu_seconds()
            if step == 1:
                first_step_s = done_at[1] - t_build
    train_rates = common.window_rates(done_at, b, args.window, args.warmup, args.steps)

    model.eval()

    def eval_pass():
        t = time.perf_counter()
        total, correct = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(y_eval), b):
                y = torch.from_numpy(y_eval[i:i + b]).long()
                logits = net(to_input(x_eval[i:i + b]))
                total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
        return time.perf_counter() - t

    eval_first_s = eval_pass()
    eval_rates = [len(y_eval) / eval_pass() for _ in range(args.eval_repeats)]
    name = "torch-compile" if args.compile else "torch-eager"
    common.report(name, args, import_s=import_s, first_step_s=first_step_s,
                  train_rates=train_rates, eval_rates=eval_rates, eval_first_s=eval_first_s,
                  train_cpu_ms_per_img=common.cpu_ms_per_image(cpu_at, b, args.warmup, args.steps),
                  extra={"torch": torch.__version__, "channels_last": args.channels_last,
                         "final_loss": float(loss)})


if __name__ == "__main__":
    main()
