"""References: the contract's operators in plain, device-agnostic PyTorch.

Run in float64 they are the oracle every implementation is checked against,
and their autograd defines the reference gradients. One module per operator
family, each function named after its operator:

- ``kernels.reference.conv2d``: ``conv2d`` (and ``conv_output_size``);
- ``kernels.reference.deform_conv2d``: ``deform_conv2d``,
  ``modulated_deform_conv2d`` (and the B0 sampling they share);
- ``kernels.reference.dcnv3``: ``dcnv3``, ``dcnv4`` (channels-last, B0);
- ``kernels.reference.roi_align``: ``roi_align``;
- ``kernels.reference.deform_roi_pool``: ``deform_roi_pool``,
  ``modulated_deform_roi_pool`` (B1);
- ``kernels.reference.deform_psroi_pool``: ``deform_psroi_pool`` (B2).

The functions are not re-exported here: a package attribute named
``deform_conv2d`` would shadow the module of that name.
"""
