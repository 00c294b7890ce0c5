"""PyTorch (CPU) eager, or ``torch.compile`` with ``--compile``; ``--model resnet`` times the
ResNet of ``configs/caltech101.py`` instead (see :func:`resnet`), ``--bf16`` under bfloat16
autocast (compare with cnnlab's ``mixed_precision=True``).

``--model stridednet`` (the default): the same StridedNet in NCHW (PyTorch's default layout; ``--channels-last`` for NHWC memory
format): Conv2d(padding=1) for the stride-2 "same" convolutions (same output sizes as Keras'
asymmetric padding: 45 -> 23 -> 12 -> 6), BatchNorm2d(eps=1e-3, momentum=0.01) = Keras'
(epsilon 1e-3, momentum 0.99), he_normal (kaiming_normal_, fan_in) weights, zero biases,
Adam(1e-4, eps=1e-7), L2 5e-4 on conv kernels added to the loss, cross-entropy on logits.
The uint8 NHWC batch is converted (``from_numpy -> permute -> float / 255``) inside the step.
``torch.set_num_threads(threads)``; the step is synchronous (eager CPU), and a window ends with
``loss.item()``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--model", choices=("stridednet", "resnet"), default="stridednet")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (forward and backward)")
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
    if args.model == "resnet":
        model, regularized, opt, loss_fn, weight_decay = resnet(torch, nn, bn)
    else:
        model, regularized, opt, loss_fn, weight_decay = stridednet(torch, nn, bn)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if args.compile else model
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    def to_input(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        return x.contiguous(memory_format=fmt)

    def train_step(images, labels):
        x, y = to_input(images), torch.from_numpy(labels).long()
        with autocast():
            logits = net(x)
        loss = loss_fn(logits.float(), y) + weight_decay * sum((k * k).sum() for k in regularized)
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
                with autocast():
                    logits = net(to_input(x_eval[i:i + b])).float()
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
                         "model": args.model, "bf16": args.bf16, "final_loss": loss.item()})


def stridednet(torch, nn, bn):
    """The tutorial's StridedNet, Adam(1e-4), L2 on the conv kernels (see the module doc)."""
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
    kernels = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    opt = torch.optim.Adam(model.parameters(), lr=common.LEARNING_RATE, eps=1e-7)
    return model, kernels, opt, nn.CrossEntropyLoss(), common.WEIGHT_DECAY


def resnet(torch, nn, bn):
    """``configs/caltech101.py``'s ResNet (cnnlab.models.resnet, basic pre-activation blocks):
    conv 5x5/2 (32, no bias) -> BN-ReLU -> max-pool 3x3/2 -> stages of 64/128/256 filters, 2
    blocks each (BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus the identity, or a 1x1 projection
    of the first pre-activation where the shape changes) -> BN-ReLU -> global average pool ->
    dropout 0.2 -> dense. SGD(0.1, Nesterov momentum 0.9), label smoothing 0.1, L2 5e-5 on
    every convolution kernel in the loss (the config's ``model.kwargs.weight_decay``). Torch's symmetric
    padding gives Keras' "same" output sizes (48 -> 24 -> 12 -> 6 -> 3 at 96 px)."""

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.bn1, self.bn2 = bn(cin), bn(cout)
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.project = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                            if stride != 1 or cin != cout else None)

        def forward(self, x):
            y = torch.relu(self.bn1(x))
            shortcut = x if self.project is None else self.project(y)
            y = self.conv1(y)
            y = self.conv2(torch.relu(self.bn2(y)))
            return y + shortcut

    layers = [nn.Conv2d(3, 32, 5, stride=2, padding=2, bias=False), bn(32), nn.ReLU(),
              nn.MaxPool2d(3, stride=2, padding=1)]
    cin = 32
    for stage, width in enumerate((64, 128, 256)):
        for block in range(2):
            layers.append(Block(cin, width, 2 if (block == 0 and stage > 0) else 1))
            cin = width
    layers += [bn(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
               nn.Linear(cin, common.NUM_CLASSES)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    kernels = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    return model, kernels, opt, nn.CrossEntropyLoss(label_smoothing=0.1), 5e-5


if __name__ == "__main__":
    main()
