"""The toy world: a small, seeded world of coloured shapes and a Stable-Diffusion-shaped model that draws it.

It exists so that NeTI Studio trains, generates and is evaluated offline on a CPU with a base model that has
learned something, through exactly the loading code that real Stable Diffusion uses.
"""
