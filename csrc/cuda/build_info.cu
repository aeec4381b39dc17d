// CUDA half of sdvae::build_info: the toolkit version and the architectures compiled in.
#include <cuda_runtime.h>

#include <string>

namespace sdvae {

std::string cuda_build_info() {
  std::string info = "CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
                     std::to_string((CUDART_VERSION % 1000) / 10);
#ifdef __CUDA_ARCH_LIST__
#define SDVAE_STR2(...) #__VA_ARGS__
#define SDVAE_STR(...) SDVAE_STR2(__VA_ARGS__)
  info += " for sm " SDVAE_STR(__CUDA_ARCH_LIST__);
#endif
  return info;
}

}  // namespace sdvae
