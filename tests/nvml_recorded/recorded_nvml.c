/* A recorded NVML device: a libnvidia-ml.so.1 that replays a recording instead of asking a driver.
 *
 * pynvml (nvidia-ml-py) loads "libnvidia-ml.so.1" with ctypes and looks its functions up by name; this
 * library exports those that hpcserve's sampler calls, with NVML's C signatures and return codes, so the
 * sampler runs its real code path on a machine without a GPU. Build it as libnvidia-ml.so.1 in a folder of
 * its own and put that folder on LD_LIBRARY_PATH (tests/nvml_fixtures.py does both).
 *
 * The recording is the file named by $HPCSERVE_NVML_RECORDING (format: hpcserve/telemetry/recorded.py):
 *   driver VERSION
 *   device UUID MEMORY_TOTAL_BYTES NAME...     (a GPU: NVML index = its place among the device lines)
 *   mig UUID MEMORY_TOTAL_BYTES NAME...        (a MIG slice: found by UUID only, not counted)
 *   sample T_S UUID UTIL_GPU_PCT MEM_USED_BYTES POWER_MW SM_CLOCK_MHZ
 * "-" in a sample field: NVML_ERROR_NOT_SUPPORTED for that reading; '#' starts a comment line.
 *
 * Replay: by wall-clock time (CLOCK_REALTIME) modulo each device's series, so every process that reads the
 * recording at the same moment sees the same row; with HPCSERVE_NVML_REPLAY=step, each utilisation read of
 * a device moves it to its next row (and memory, power and clock read that row).
 * Without a readable recording nvmlInit fails with NVML_ERROR_DRIVER_NOT_LOADED, as on a node with no driver.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3, NVML_ERROR_NOT_FOUND = 6, NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9, NVML_ERROR_UNKNOWN = 999
};
enum { NVML_CLOCK_GRAPHICS = 0, NVML_CLOCK_SM = 1 };

#define NA (-1LL) /* a "-" field: not supported */
#define MAX_DEVICES 64
#define TEXT 96

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;

typedef struct {
    double t;
    long long util, mem_used, power_mw, sm_clock;
} row_t;

typedef struct device {
    int counted; /* a GPU (1) or a MIG slice (0) */
    unsigned index;
    char uuid[TEXT], name[TEXT];
    unsigned long long mem_total;
    row_t *rows;
    size_t n_rows, cap_rows, cursor;
} device_t;

typedef struct device *nvmlDevice_t;

static device_t devices[MAX_DEVICES];
static size_t n_devices;
static unsigned n_counted;
static int init_count;
static char driver[TEXT] = "recorded";

static device_t *by_uuid(const char *uuid) {
    for (size_t i = 0; i < n_devices; i++)
        if (strcmp(devices[i].uuid, uuid) == 0) return &devices[i];
    return NULL;
}

static long long field(const char *text) {
    return strcmp(text, "-") == 0 ? NA : strtoll(text, NULL, 10);
}

static void copy_text(char *dst, const char *src) {
    size_t n = strcspn(src, "\r\n");
    n = n < TEXT - 1 ? n : TEXT - 1; /* a longer name is cut */
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static int add_device(int counted, const char *line) {
    device_t *d = &devices[n_devices];
    int used = 0;
    memset(d, 0, sizeof *d);
    d->counted = counted;
    if (counted) {
        d->index = n_counted;
        if (sscanf(line, "device %95s %llu %n", d->uuid, &d->mem_total, &used) < 2) return -1;
    } else if (sscanf(line, "mig %95s %llu %n", d->uuid, &d->mem_total, &used) < 2) {
        return -1;
    }
    copy_text(d->name, line + used);
    n_devices++;
    n_counted += (unsigned)counted;
    return 0;
}

static int add_sample(const char *line) {
    char uuid[TEXT], f[4][32];
    double t;
    if (sscanf(line, "sample %lf %95s %31s %31s %31s %31s", &t, uuid, f[0], f[1], f[2], f[3]) != 6) return -1;
    device_t *d = by_uuid(uuid);
    if (d == NULL) return -1;
    if (d->n_rows == d->cap_rows) {
        d->cap_rows = d->cap_rows ? 2 * d->cap_rows : 64;
        d->rows = realloc(d->rows, d->cap_rows * sizeof *d->rows);
        if (d->rows == NULL) return -1;
    }
    d->rows[d->n_rows++] = (row_t){t, field(f[0]), field(f[1]), field(f[2]), field(f[3])};
    return 0;
}

static int parse_line(const char *line) {
    if (line[0] == '#' || line[0] == '\n' || line[0] == '\0') return 0;
    if (strncmp(line, "driver ", 7) == 0) {
        copy_text(driver, line + 7);
        return 0;
    }
    if (n_devices < MAX_DEVICES && strncmp(line, "device ", 7) == 0) return add_device(1, line);
    if (n_devices < MAX_DEVICES && strncmp(line, "mig ", 4) == 0) return add_device(0, line);
    if (strncmp(line, "sample ", 7) == 0) return add_sample(line);
    return -1;
}

static void forget(void) {
    for (size_t i = 0; i < n_devices; i++) free(devices[i].rows);
    n_devices = 0;
    n_counted = 0;
}

static nvmlReturn_t load(void) {
    const char *path = getenv("HPCSERVE_NVML_RECORDING");
    FILE *in = path ? fopen(path, "r") : NULL;
    char line[512];
    int bad = 0;
    if (in == NULL) return NVML_ERROR_DRIVER_NOT_LOADED;
    forget();
    while (!bad && fgets(line, sizeof line, in)) bad = parse_line(line) != 0;
    fclose(in);
    if (bad) {
        fprintf(stderr, "recorded NVML: %s: cannot read the line: %s", path, line);
        forget();
        return NVML_ERROR_UNKNOWN;
    }
    return NVML_SUCCESS;
}

static double fmod_positive(double x, double period) {
    double r = fmod(x, period);
    return r < 0 ? r + period : r;
}

/* The row a reading sees now (NULL: the device has no samples). */
static const row_t *row(device_t *d, int advance) {
    if (d->n_rows == 0) return NULL;
    const char *mode = getenv("HPCSERVE_NVML_REPLAY");
    if (mode != NULL && strcmp(mode, "step") == 0) {
        if (advance) d->cursor = (d->cursor + 1) % d->n_rows;
        return &d->rows[d->cursor];
    }
    double step = d->n_rows > 1 ? d->rows[1].t - d->rows[0].t : 1.0;
    double period = d->rows[d->n_rows - 1].t - d->rows[0].t + (step > 0 ? step : 1.0);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    double at = d->rows[0].t + fmod_positive((double)now.tv_sec + now.tv_nsec / 1e9, period);
    size_t i = 0;
    while (i + 1 < d->n_rows && d->rows[i + 1].t <= at) i++;
    return &d->rows[i];
}

/* ------------------------------------------------------------------------------------ NVML's API */
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    if (init_count == 0) {
        nvmlReturn_t ret = load();
        if (ret != NVML_SUCCESS) return ret;
    }
    init_count++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (--init_count == 0) forget();
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t put_text(char *dst, unsigned int length, const char *src) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (dst == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    return put_text(version, length, driver);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *count = n_counted;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    for (size_t i = 0; device != NULL && i < n_devices; i++) {
        if (devices[i].counted && devices[i].index == index) {
            *device = &devices[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_INVALID_ARGUMENT;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (uuid == NULL || device == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    device_t *d = by_uuid(uuid);
    if (d == NULL) return NVML_ERROR_NOT_FOUND;
    *device = d;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    return device == NULL ? NVML_ERROR_INVALID_ARGUMENT : put_text(uuid, length, device->uuid);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    return device == NULL ? NVML_ERROR_INVALID_ARGUMENT : put_text(name, length, device->name);
}

/* The row for a reading, or an error code in *ret. */
static const row_t *reading(nvmlDevice_t device, const void *out, int advance, nvmlReturn_t *ret) {
    *ret = init_count == 0 ? NVML_ERROR_UNINITIALIZED
         : device == NULL || out == NULL ? NVML_ERROR_INVALID_ARGUMENT
         : NVML_SUCCESS;
    const row_t *r = *ret == NVML_SUCCESS ? row(device, advance) : NULL;
    if (*ret == NVML_SUCCESS && r == NULL) *ret = NVML_ERROR_NOT_SUPPORTED;
    return r;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    nvmlReturn_t ret;
    const row_t *r = reading(device, utilization, 1, &ret);
    if (r == NULL) return ret;
    if (r->util == NA) return NVML_ERROR_NOT_SUPPORTED;
    utilization->gpu = (unsigned)r->util;
    utilization->memory = 0; /* not recorded */
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    nvmlReturn_t ret;
    const row_t *r = reading(device, memory, 0, &ret);
    if (r == NULL) return ret;
    if (r->mem_used == NA) return NVML_ERROR_NOT_SUPPORTED;
    memory->total = device->mem_total;
    memory->used = (unsigned long long)r->mem_used;
    memory->free = memory->total > memory->used ? memory->total - memory->used : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    nvmlReturn_t ret;
    const row_t *r = reading(device, power, 0, &ret);
    if (r == NULL) return ret;
    if (r->power_mw == NA) return NVML_ERROR_NOT_SUPPORTED;
    *power = (unsigned)r->power_mw;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, int type, unsigned int *clock) {
    nvmlReturn_t ret;
    const row_t *r = reading(device, clock, 0, &ret);
    if (r == NULL) return ret;
    if ((type != NVML_CLOCK_SM && type != NVML_CLOCK_GRAPHICS) || r->sm_clock == NA)
        return NVML_ERROR_NOT_SUPPORTED;
    *clock = (unsigned)r->sm_clock;
    return NVML_SUCCESS;
}
