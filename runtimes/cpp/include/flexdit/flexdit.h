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
 *
 * Compatibility (from FLEXDIT_API_VERSION 4 on)
 *  - Every struct passed across this API starts with `size_t struct_size`, the sizeof the caller
 *    was compiled with; the *_init functions of this header set it. New fields are only ever
 *    appended, and a new field's zero value means what the API did before it existed. So:
 *    a caller built against an older header keeps working with a newer library (the library
 *    reads and writes only struct_size bytes, the fields beyond them take their defaults), and
 *    a caller built against a newer header works with an older library as long as it leaves the
 *    fields that library does not know at zero (else FLEXDIT_ERR_ARGUMENT names the struct).
 *  - Functions are only added, never changed; check flexdit_api_version() before calling one
 *    that is newer than the library you may meet.
 *  - A struct_size of 0 (not initialised) or below the API 4 size is refused (FLEXDIT_ERR_ARGUMENT).
 */
#ifndef FLEXDIT_H
#define FLEXDIT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

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
 *    flexdit_api_version() >= 3 before asking a library for a solver.
 * 4: struct_size first in every struct (the rules above), per-stage timings of any length
 *    (flexdit_timing.stage_seconds is the caller's array), the step-wise sampler
 *    (flexdit_request_*). A layout change, the last one: rebuild callers against this header
 *    (the library's soname changed with it, so an old binary cannot load it by mistake). */
#define FLEXDIT_API_VERSION 4

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
  size_t struct_size;       /* sizeof(flexdit_load_options), set by flexdit_load_options_init */
  int threads;              /* intra-op threads of the process's one shared pool; 0 = ONNX Runtime's
                               default. Every model of a process must use the same value. */
  const char* precision;    /* NULL or a precision override, e.g. "int8:stages=0-2,fp32:stages=3" */
  int verify_checksums;     /* 1 (default): sha256 of every bundle file before use */
  int prepack_weights;      /* 1 (default): ONNX Runtime pre-packs weights once, shared by stages */
  int shared_graphs;        /* 1 (default): stages whose graphs the bundle shares (manifest
                               shared_graphs) run through one session of that graph; 0: one
                               session per stage. Same results either way. */
} flexdit_load_options;

/* Fills the defaults of the first struct_size bytes (use flexdit_load_options_init). Thread-safe. */
FLEXDIT_API void flexdit_load_options_init_size(flexdit_load_options* options, size_t struct_size);
static inline void flexdit_load_options_init(flexdit_load_options* options) {
  flexdit_load_options_init_size(options, sizeof *options);
}

/* Loads and verifies a bundle directory (options may be NULL). Thread-safe. */
FLEXDIT_API flexdit_status flexdit_model_load(const char* bundle_dir, const flexdit_load_options* options,
                                              flexdit_model** out_model);
/* Frees a model (NULL is fine). Not concurrently with any other call on the same model. */
FLEXDIT_API void flexdit_model_free(flexdit_model* model);

typedef struct flexdit_model_info {
  size_t struct_size; /* sizeof(flexdit_model_info): set it (or flexdit_model_info_init) before the call */
  int latent_channels, latent_height, latent_width; /* shape of one sample (C, H, W) */
  int image_height, image_width, image_channels;    /* shape of one uint8 image (H, W, C) */
  int num_classes, null_class, num_stages, num_timesteps;
  int has_decoder;
} flexdit_model_info;

static inline void flexdit_model_info_init(flexdit_model_info* info) {
  memset(info, 0, sizeof *info);
  info->struct_size = sizeof *info;
}
/* Writes the first out_info->struct_size bytes. Thread-safe. */
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
  size_t struct_size;         /* sizeof(flexdit_sample_options), set by flexdit_sample_options_init */
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
  int batch;                  /* images denoised together; 0 = what one graph call holds
                                 (flexdit_sample only: a request's rows always step together) */
  const float* init_noise;    /* NULL or x_T: n*C*H*W float32 (or C*H*W for every image) */
  size_t init_noise_count;    /* number of floats in init_noise */
  flexdit_noise_fn noise_fn;  /* NULL = the built-in per-image generator */
  void* noise_user;
  flexdit_progress_fn progress;
  void* progress_user;
} flexdit_sample_options;

/* Fills the defaults of the first struct_size bytes (everything from the bundle, seed 0); use
 * flexdit_sample_options_init. Thread-safe. */
FLEXDIT_API void flexdit_sample_options_init_size(flexdit_sample_options* options, size_t struct_size);
static inline void flexdit_sample_options_init(flexdit_sample_options* options) {
  flexdit_sample_options_init_size(options, sizeof *options);
}

typedef struct flexdit_timing {
  size_t struct_size;      /* sizeof(flexdit_timing): set by flexdit_timing_init */
  double seconds;          /* whole call (a request: from start to the end of finish) */
  double ort_seconds;      /* inside ONNX Runtime Run calls (a request: its share by rows) */
  double decoder_seconds;
  double* stage_seconds;   /* in: NULL or the caller's array of stage_seconds_capacity doubles
                              (flexdit_model_info.num_stages are needed); out: seconds per stage id */
  size_t stage_seconds_capacity;
  size_t num_stages;       /* out: how many stage_seconds were written (the model's stages) */
} flexdit_timing;

static inline void flexdit_timing_init(flexdit_timing* timing, double* stage_seconds, size_t capacity) {
  memset(timing, 0, sizeof *timing);
  timing->struct_size = sizeof *timing;
  timing->stage_seconds = stage_seconds;
  timing->stage_seconds_capacity = capacity;
}

/* Samples n images of the given class ids. Any output pointer may be NULL (not wanted):
 *   samples: n * C * H * W float32 final sampler states (latent space); capacity in floats
 *   images:  n * image_height * image_width * image_channels uint8 pixels; capacity in bytes
 * Thread-safe: several threads may sample from one model at once. */
FLEXDIT_API flexdit_status flexdit_sample(const flexdit_model* model, const int64_t* class_ids, size_t n,
                                          const flexdit_sample_options* options, float* samples,
                                          size_t samples_capacity, uint8_t* images, size_t images_capacity,
                                          flexdit_timing* timing);

/* The step-wise sampler (the Python runtime's Model.start/step/finish): a request is one set of
 * images walking its sampler chain; flexdit_request_step advances several requests by one step
 * at once, the rows of requests whose next timestep lies in the same stage sharing that stage's
 * graph calls. A request gives the same samples as flexdit_sample with the same class ids and
 * options, whatever it is stepped with. Misuse is an error, never undefined: stepping a
 * finished request, finishing an unfinished one or one finished already, and any call on a
 * freed request return FLEXDIT_ERR_ARGUMENT (a freed handle stays refused until a new request
 * happens to reuse its address). Free every request before its model. */
typedef struct flexdit_request flexdit_request;

/* Checks everything flexdit_sample checks and draws x_T. Thread-safe. */
FLEXDIT_API flexdit_status flexdit_request_start(const flexdit_model* model, const int64_t* class_ids, size_t n,
                                                 const flexdit_sample_options* options, flexdit_request** out_request);
/* One denoising step of each of `count` unfinished requests of `model` (each at most once). A
 * request whose step fails (non-finite values, its noise callback, ONNX Runtime) stops with its
 * own error, which flexdit_request_finish returns; the others go on and this call returns
 * FLEXDIT_OK. Refused before any work: NULL, freed, finished or repeated requests, or another
 * model's. Thread-safe for disjoint sets of requests. */
FLEXDIT_API flexdit_status flexdit_request_step(const flexdit_model* model, flexdit_request* const* requests,
                                                size_t count);
/* Steps left (0: done - finished sampling or stopped by an error). Thread-safe with respect to
 * other requests. */
FLEXDIT_API flexdit_status flexdit_request_steps_left(const flexdit_request* request, int* out_steps_left);
/* Decodes a done request into the caller's buffers, as flexdit_sample does; returns the error
 * that stopped it, if one did. Once per request (buffers too small do not count). */
FLEXDIT_API flexdit_status flexdit_request_finish(flexdit_request* request, float* samples, size_t samples_capacity,
                                                  uint8_t* images, size_t images_capacity, flexdit_timing* timing);
/* Frees a request (NULL is fine; a freed one is FLEXDIT_ERR_ARGUMENT). Not concurrently with
 * another call on it. */
FLEXDIT_API flexdit_status flexdit_request_free(flexdit_request* request);

#ifdef __cplusplus
}
#endif
#endif /* FLEXDIT_H */
