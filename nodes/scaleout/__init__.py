"""Training on several devices: the node launches the shared training core in worker processes
(``torchrun``, or ``accelerate launch`` with a user's config) that load the model headless with
``comfy.sd``, and follows their progress. One device never starts a process."""
