"""SWALP on a network of your own: a small CNN on scikit-learn's digits with
every number in 8-bit block floating point, its weights averaged by SWA."""

import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

import swalp

torch.manual_seed(0)
digits = load_digits()
images, labels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16, torch.tensor(digits.target)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[:1350], labels[:1350]), batch_size=32,
                                     shuffle=True)
net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                    nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
swa_net = AveragedModel(net)  # a full-precision copy, taken before the quantizers are attached
noise = swalp.StepNoise(seed=0)  # the rounding noise: a function of (seed, step) alone
swalp.quantize_model(net, "bfp8", "bfp8", noise=noise)  # activations, and errors in the backward pass
sgd = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
optimizer = swalp.wrap_optimizer(sgd, weight="bfp8", grad="bfp8", momentum="bfp8", noise=noise)
swa_scheduler = SWALR(sgd, swa_lr=0.01, anneal_epochs=1)
for epoch in range(16):
    for inputs, targets in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(inputs), targets).backward()
        optimizer.step()
    if epoch >= 8:  # the SWA phase: a constant low rate, one average per epoch
        swa_net.update_parameters(net)
        swa_scheduler.step()
update_bn(loader, swa_net)
with torch.no_grad():
    for name, model in (("SGD, 8-bit weights", net.eval()), ("SWA of the 8-bit weights", swa_net.eval())):
        error = (model(images[1350:]).argmax(1) != labels[1350:]).float().mean().item()
        print(f"{name}: test error {100 * error:.2f}%")
