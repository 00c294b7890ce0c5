// oneDNN's forward convolutions of the caltech101 ResNet (96 px, batch 32, float32) timed alone,
// outside XLA: NHWC activations (what cnnlab's conv.cc gives oneDNN) against the activation
// format oneDNN would choose ("any") plus the reorders into and out of it. Median and best of 30
// calls after 5 warm-up calls. Build and run (venv active, oneDNN from PyPI):
//   g++ -O2 -std=c++17 experiments/bench/onednn_alone.cc -I$VIRTUAL_ENV/include -L$VIRTUAL_ENV/lib \
//       -Wl,-rpath,$VIRTUAL_ENV/lib -ldnnl -o /tmp/onednn_alone
//   OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 /tmp/onednn_alone
//   OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 ONEDNN_MAX_CPU_ISA=AVX2 /tmp/onednn_alone
#include <chrono>
#include <cstdio>
#include <vector>
#include <algorithm>
#include "oneapi/dnnl/dnnl.hpp"
using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;
double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

struct Case { int n, c, h, w, oc, k, s, p; const char* name; };

int main() {
  engine eng(engine::kind::cpu, 0);
  stream st(eng);
  Case cases[] = {{32,3,96,96,32,5,2,2,"stem 5x5/2 3->32"}, {32,32,24,24,64,3,1,1,"3x3 32->64 24"},
                  {32,64,24,24,64,3,1,1,"3x3 64->64 24"}, {32,64,24,24,128,3,2,1,"3x3/2 64->128"},
                  {32,128,12,12,128,3,1,1,"3x3 128->128 12"}, {32,256,6,6,256,3,1,1,"3x3 256->256 6"}};
  for (auto& c : cases) {
    int oh = (c.h + 2*c.p - c.k)/c.s + 1, ow = (c.w + 2*c.p - c.k)/c.s + 1;
    memory::dims src_d{c.n,c.c,c.h,c.w}, w_d{c.oc,c.c,c.k,c.k}, dst_d{c.n,c.oc,oh,ow};
    auto user_src = memory({src_d, dt::f32, tag::nhwc}, eng);
    auto user_dst = memory({dst_d, dt::f32, tag::nhwc}, eng);
    std::fill((float*)user_src.get_data_handle(), (float*)user_src.get_data_handle() + (size_t)c.n*c.c*c.h*c.w, 0.5f);
    for (int variant = 0; variant < 2; ++variant) {
      memory::desc sd = variant ? memory::desc(src_d, dt::f32, tag::any) : user_src.get_desc();
      memory::desc dd = variant ? memory::desc(dst_d, dt::f32, tag::any) : user_dst.get_desc();
      auto pd = convolution_forward::primitive_desc(eng, prop_kind::forward_training, algorithm::convolution_direct,
          sd, memory::desc(w_d, dt::f32, tag::any), dd, {c.s,c.s}, {0,0}, {c.p,c.p}, {c.p,c.p});
      memory w(pd.weights_desc(), eng), src = user_src, dst = user_dst;
      bool rs = pd.src_desc() != user_src.get_desc(), rd = pd.dst_desc() != user_dst.get_desc();
      if (rs) src = memory(pd.src_desc(), eng);
      if (rd) dst = memory(pd.dst_desc(), eng);
      convolution_forward conv(pd);
      std::fill((float*)w.get_data_handle(), (float*)w.get_data_handle() + pd.weights_desc().get_size()/4, 0.01f);
      // the reorder primitives are built once
      reorder r1, r2; if (rs) r1 = reorder(user_src, src); if (rd) r2 = reorder(dst, user_dst);
      auto run2 = [&]() {
        if (rs) r1.execute(st, user_src, src);
        conv.execute(st, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, dst}});
        if (rd) r2.execute(st, dst, user_dst);
        st.wait();
      };
      for (int i = 0; i < 5; ++i) run2();
      std::vector<double> ts;
      for (int i = 0; i < 30; ++i) { double t = now(); run2(); ts.push_back(now() - t); }
      std::sort(ts.begin(), ts.end());
      std::printf("%-20s %-5s impl=%-28s reorders=%d%d  median %.2f ms  min %.2f\n", c.name, variant ? "any" : "nhwc",
                  pd.impl_info_str(), rs, rd, ts[ts.size()/2]*1e3, ts[0]*1e3);
    }
  }
}
