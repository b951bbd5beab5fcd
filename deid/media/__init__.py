"""Media I/O: videos (PyAV, exact timing, audio pass-through) and still images, and the sample media shipped by
installed packages."""
