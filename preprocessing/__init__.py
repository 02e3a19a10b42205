"""The eight-step pipeline that turns a photo into the model input, and reading photos.

OpenCV runs each call on one thread. Photos are decoded and preprocessed in parallel on a worker
pool (``num_workers``), one photo per worker, so OpenCV's own threads inside each call only
compete with that pool and with the backbone: on 2 cores a screw photo cost 37 ms of CPU with
them and 19 ms without, and took longer even alone (23 against 19 ms).
"""

import cv2

cv2.setNumThreads(1)
