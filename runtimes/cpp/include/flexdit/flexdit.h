/* flexdit.h - the C API of the flexdit C++ runtime: load a flexdit bundle (manifest.json + one
 * ONNX graph per token-density stage) and sample images from it.
 *
 * Conventions
 *  - Every function that can fail returns a flexdit_status; FLEXDIT_OK (0) is success. The
 *    message of the last failure on the calling thread is flexdit_last_error() (thread-local,
 *    valid until the next failing call on that thread). No C++ exception crosses this API.
 *  - Handles are opaque. Output buffers are owned by the caller; a call that needs more room
 *    than given fails with FLEXDIT_ERR_ARGUMENT and writes nothing (ask flexdit_model_info).
 *  - Thread safety is stated per function. A model is immutable after loading.
 */
#ifndef FLEXDIT_H
#define FLEXDIT_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#if defined(FLEXDIT_BUILDING_LIBRARY)
#define FLEXDIT_API __declspec(dllexport)
#else
#define FLEXDIT_API __declspec(dllimport)
#endif
#else
#define FLEXDIT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* 2: flexdit_load_options.shared_graphs (the struct grew: rebuild callers against this header)
 * 3: the few-step solvers (sampler "dpmpp-2m", "unipc", "euler"; spacing "linspace"; spacing NULL
 *    is the sampler's own). No layout change: callers built against 2 run unchanged; check
 *    flexdit_api_version() >= 3 before asking a library for a solver. */
#define FLEXDIT_API_VERSION 3

typedef enum flexdit_status {
  FLEXDIT_OK = 0,
  FLEXDIT_ERR_BUNDLE = 1,   /* the bundle cannot be trusted or used (missing, tampered, malformed) */
  FLEXDIT_ERR_PROMPT = 2,   /* unknown class name / id, unreadable or empty prompt text */
  FLEXDIT_ERR_ARGUMENT = 3, /* an option out of range, a null pointer, an output buffer too small */
  FLEXDIT_ERR_RUNTIME = 4,  /* ONNX Runtime failed to load or run a graph */
  FLEXDIT_ERR_IO = 5,       /* a file the caller named cannot be read or written */
  FLEXDIT_ERR_MEMORY = 6,   /* out of memory */
  FLEXDIT_ERR_INTERNAL = 7  /* a bug: please report the message */
} flexdit_status;

typedef struct flexdit_model flexdit_model;

/* "0.1.0". Thread-safe. */
FLEXDIT_API const char* flexdit_version(void);
/* FLEXDIT_API_VERSION of the library (compare with the header's). Thread-safe. */
FLEXDIT_API int flexdit_api_version(void);
/* The message of the last failure on this thread ("" if none). Thread-safe (thread-local). */
FLEXDIT_API const char* flexdit_last_error(void);
/* A short name of a status ("bundle error", ...). Thread-safe. */
FLEXDIT_API const char* flexdit_status_name(flexdit_status status);

typedef struct flexdit_load_options {
  int threads;              /* intra-op threads of the process's one shared pool; 0 = ONNX Runtime's
                               default. Every model of a process must use the same value. */
  const char* precision;    /* NULL or a precision override, e.g. "int8:stages=0-2,fp32:stages=3" */
  int verify_checksums;     /* 1 (default): sha256 of every bundle file before use */
  int prepack_weights;      /* 1 (default): ONNX Runtime pre-packs weights once, shared by stages */
  int shared_graphs;        /* 1 (default): stages whose graphs the bundle shares (manifest
                               shared_graphs) run through one session of that graph; 0: one
                               session per stage. Same results either way. */
} flexdit_load_options;

/* Fills the defaults. Thread-safe. */
FLEXDIT_API void flexdit_load_options_init(flexdit_load_options* options);

/* Loads and verifies a bundle directory (options may be NULL). Thread-safe. */
FLEXDIT_API flexdit_status flexdit_model_load(const char* bundle_dir, const flexdit_load_options* options,
                                              flexdit_model** out_model);
/* Frees a model (NULL is fine). Not concurrently with any other call on the same model. */
FLEXDIT_API void flexdit_model_free(flexdit_model* model);

typedef struct flexdit_model_info {
  int latent_channels, latent_height, latent_width; /* shape of one sample (C, H, W) */
  int image_height, image_width, image_channels;    /* shape of one uint8 image (H, W, C) */
  int num_classes, null_class, num_stages, num_timesteps;
  int has_decoder;
} flexdit_model_info;

/* Thread-safe. */
FLEXDIT_API flexdit_status flexdit_model_info_get(const flexdit_model* model, flexdit_model_info* out_info);
/* The precision stage `stage` runs ("fp32", "int8-dynamic", ...); NULL when out of range.
 * The string lives as long as the model. Thread-safe. */
FLEXDIT_API const char* flexdit_model_stage_precision(const flexdit_model* model, int stage);

/* A prompt (class name, any alias, case-insensitive, or a class id) -> class id. Thread-safe. */
FLEXDIT_API flexdit_status flexdit_model_resolve_class(const flexdit_model* model, const char* prompt,
                                                       int64_t* out_class_id);
/* Writes the display label of a class ("" + NUL truncated to capacity). Thread-safe. */
FLEXDIT_API flexdit_status flexdit_model_class_label(const flexdit_model* model, int64_t class_id, char* out,
                                                     size_t capacity);

/* Fresh noise of step k for `count` images at positions `indices` of the request: write
 * count * C * H * W float32 values (image-major, C order) to `out`. Return 0 on success; any
 * other value aborts sampling with FLEXDIT_ERR_ARGUMENT. Called on the sampling thread. */
typedef int (*flexdit_noise_fn)(void* user, int k, const int* indices, size_t count, float* out);
/* Called after every denoising step of every group of images (may be NULL). */
typedef void (*flexdit_progress_fn)(void* user);

typedef struct flexdit_sample_options {
  int steps;                  /* 0 = the bundle's default */
  const char* sampler;        /* NULL = the bundle's default; "ddpm", "ddim", or a few-step solver:
                                 "dpmpp-2m", "unipc", "euler" (README: Samplers) */
  double cfg_scale;           /* < 0 = the bundle's default; <= 1 disables guidance */
  double eta;                 /* < 0 = the bundle's default; DDIM eta in [0, 1]; a solver takes
                                 none (>= 0 with a solver is refused) */
  const char* spacing;        /* NULL = the sampler's own: "sections" for ddpm/ddim, "linspace" for
                                 the solvers; "ddim" (striding); "sections"/"ddim" also for
                                 dpmpp-2m/unipc; euler takes only "linspace" */
  int clip_denoised;          /* -1 = the bundle's default; 0 or 1 */
  uint64_t seed;              /* image i draws from its own generator (seed, i): see README */
  int batch;                  /* images denoised together; 0 = what one graph call holds */
  const float* init_noise;    /* NULL or x_T: n*C*H*W float32 (or C*H*W for every image) */
  size_t init_noise_count;    /* number of floats in init_noise */
  flexdit_noise_fn noise_fn;  /* NULL = the built-in per-image generator */
  void* noise_user;
  flexdit_progress_fn progress;
  void* progress_user;
} flexdit_sample_options;

/* Fills the defaults (everything from the bundle, seed 0). Thread-safe. */
FLEXDIT_API void flexdit_sample_options_init(flexdit_sample_options* options);

typedef struct flexdit_timing {
  double seconds;            /* whole call */
  double ort_seconds;        /* inside ONNX Runtime Run calls */
  double decoder_seconds;
  double stage_seconds[16];  /* per stage id (first 16 stages) */
} flexdit_timing;

/* Samples n images of the given class ids. Any output pointer may be NULL (not wanted):
 *   samples: n * C * H * W float32 final sampler states (latent space); capacity in floats
 *   images:  n * image_height * image_width * image_channels uint8 pixels; capacity in bytes
 * Thread-safe: several threads may sample from one model at once. */
FLEXDIT_API flexdit_status flexdit_sample(const flexdit_model* model, const int64_t* class_ids, size_t n,
                                          const flexdit_sample_options* options, float* samples,
                                          size_t samples_capacity, uint8_t* images, size_t images_capacity,
                                          flexdit_timing* timing);

#ifdef __cplusplus
}
#endif
#endif /* FLEXDIT_H */
