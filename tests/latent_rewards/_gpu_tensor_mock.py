"""A CPU stand-in for tensors on a GPU, for the paths that take numpy arrays from tensors.

``OnGPU`` tensors compute on the CPU but refuse ``.numpy()`` (and ``np.asarray``) as CUDA tensors do, until they
went through ``.cpu()``; torch ops on them (indexing, ``.to(...)``, a forward pass) keep them "on the GPU".
"""

import torch


class OnGPU(torch.Tensor):
    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def on_gpu(t):
    return None if t is None else t.as_subclass(OnGPU)
