/* Embeds the flexdit runtime through its C API: load a bundle, resolve prompts, sample with
 * guidance and the built-in seeded noise, print a summary of each image and each stage's time,
 * then sample the same images step-wise beside a second request and check they are identical.
 * usage: flexdit_example_c BUNDLE [PROMPT ...]   (prompts: class names or ids; default "0") */
#include <flexdit/flexdit.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
  flexdit_model_info_init(&info);
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
  double* stage_seconds = calloc((size_t)info.num_stages, sizeof *stage_seconds);
  flexdit_timing timing;
  flexdit_timing_init(&timing, stage_seconds, (size_t)info.num_stages);
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
  for (size_t st = 0; st < timing.num_stages; ++st) printf("  stage %zu: %.4f s\n", st, stage_seconds[st]);

  /* the step-wise API: the same request, stepped together with a DDIM one of other length */
  flexdit_sample_options other;
  flexdit_sample_options_init(&other);
  other.steps = 4;
  other.sampler = "ddim";
  flexdit_request* reqs[2] = {NULL, NULL};
  if ((s = flexdit_request_start(model, ids, n, &so, &reqs[0])) != FLEXDIT_OK) return fail("starting a request", s);
  if ((s = flexdit_request_start(model, ids, 1, &other, &reqs[1])) != FLEXDIT_OK) return fail("starting a request", s);
  int steps = 0;
  for (;;) {
    flexdit_request* live[2];
    size_t count = 0;
    for (int r = 0; r < 2; ++r) {
      int left = 0;
      flexdit_request_steps_left(reqs[r], &left);
      if (left > 0) live[count++] = reqs[r];
    }
    if (count == 0) break;
    if ((s = flexdit_request_step(model, live, count)) != FLEXDIT_OK) return fail("stepping", s);
    ++steps;
  }
  uint8_t* stepped = malloc(n * per_image);
  if ((s = flexdit_request_finish(reqs[0], NULL, 0, stepped, n * per_image, NULL)) != FLEXDIT_OK)
    return fail("finishing a request", s);
  if ((s = flexdit_request_finish(reqs[1], NULL, 0, NULL, 0, NULL)) != FLEXDIT_OK) return fail("finishing a request", s);
  int same = memcmp(stepped, pixels, n * per_image) == 0;
  printf("step-wise: %d steps for both requests, images %s flexdit_sample's\n", steps,
         same ? "identical to" : "DIFFER from");
  flexdit_request_free(reqs[0]);
  flexdit_request_free(reqs[1]);
  free(stepped);
  /* errors are values, not crashes: an unknown class */
  int64_t bad;
  s = flexdit_model_resolve_class(model, "no such class", &bad);
  printf("unknown prompt -> %s: %s\n", flexdit_status_name(s), flexdit_last_error());
  free(pixels);
  free(stage_seconds);
  free(ids);
  flexdit_model_free(model);
  return s == FLEXDIT_ERR_PROMPT && same ? 0 : 1;
}
