"""Small video files for the tests: real H.264 clips with hard cuts."""
import numpy as np

PALETTE = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40), (200, 40, 200), (40, 210, 210)]


def write_clip(path, shot_lengths, size=(64, 48), fps=25, noise=6.0, seed=0):
    """A small H.264 clip: one solid colour per shot (from PALETTE) plus Gaussian noise, so cuts are real."""
    import av
    rng = np.random.default_rng(seed)
    w, h = size
    with av.open(str(path), 'w') as out:
        st = out.add_stream('libx264', rate=fps)
        st.width, st.height, st.pix_fmt = w, h, 'yuv420p'
        for i, n in enumerate(shot_lengths):
            colour = np.array(PALETTE[i % len(PALETTE)], np.float32)
            for _ in range(n):
                fr = np.clip(colour + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)
                for pkt in st.encode(av.VideoFrame.from_ndarray(fr, format='rgb24')):
                    out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return str(path)
