/* Embeds the flexdit runtime through its C API: load a bundle, resolve prompts, sample with
 * guidance and the built-in seeded noise, print a summary of each image.
 * usage: flexdit_example_c BUNDLE [PROMPT ...]   (prompts: class names or ids; default "0") */
#include <flexdit/flexdit.h>
#include <stdio.h>
#include <stdlib.h>

static int fail(const char* what, flexdit_status s) {
  fprintf(stderr, "flexdit_example_c: %s failed (%s): %s\n", what, flexdit_status_name(s), flexdit_last_error());
  return 1;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s BUNDLE [PROMPT ...]\n", argv[0]);
    return 2;
  }
  printf("flexdit runtime %s (C API %d)\n", flexdit_version(), flexdit_api_version());
  flexdit_load_options lo;
  flexdit_load_options_init(&lo);
  lo.threads = 1;
  flexdit_model* model = NULL;
  flexdit_status s = flexdit_model_load(argv[1], &lo, &model);
  if (s != FLEXDIT_OK) return fail("loading the bundle", s);
  flexdit_model_info info;
  flexdit_model_info_get(model, &info);
  printf("%d stages, %d classes, latent %dx%dx%d, images %dx%dx%d\n", info.num_stages, info.num_classes,
         info.latent_channels, info.latent_height, info.latent_width, info.image_height, info.image_width,
         info.image_channels);
  size_t n = argc > 2 ? (size_t)(argc - 2) : 1;
  int64_t* ids = calloc(n, sizeof *ids);
  for (size_t i = 0; i < n; ++i) {
    s = flexdit_model_resolve_class(model, argc > 2 ? argv[2 + i] : "0", &ids[i]);
    if (s != FLEXDIT_OK) return fail("resolving a prompt", s);
  }
  flexdit_sample_options so;
  flexdit_sample_options_init(&so);
  so.steps = 10;
  so.cfg_scale = 2.0;
  so.seed = 42;
  size_t per_image = (size_t)info.image_height * info.image_width * info.image_channels;
  uint8_t* pixels = malloc(n * per_image);
  flexdit_timing timing;
  s = flexdit_sample(model, ids, n, &so, NULL, 0, pixels, n * per_image, &timing);
  if (s != FLEXDIT_OK) return fail("sampling", s);
  for (size_t i = 0; i < n; ++i) {
    char label[64];
    double mean = 0;
    for (size_t p = 0; p < per_image; ++p) mean += pixels[i * per_image + p];
    flexdit_model_class_label(model, ids[i], label, sizeof label);
    printf("image %zu: class %s, mean pixel %.1f\n", i, label, mean / per_image);
  }
  printf("%.3f s total, %.1f%% inside ONNX Runtime\n", timing.seconds, 100.0 * timing.ort_seconds / timing.seconds);
  /* errors are values, not crashes: an unknown class */
  int64_t bad;
  s = flexdit_model_resolve_class(model, "no such class", &bad);
  printf("unknown prompt -> %s: %s\n", flexdit_status_name(s), flexdit_last_error());
  free(pixels);
  free(ids);
  flexdit_model_free(model);
  return s == FLEXDIT_ERR_PROMPT ? 0 : 1;
}
